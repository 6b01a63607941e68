"""Token importance from attention, retention schedules, and the pruned decode cache.

Importance of prompt token ``j`` at layer ``l``: the attention mass that the last
``window`` prompt queries put on ``j`` (summed over heads and queries), recorded
while the stock attention runs (the attention function that
:mod:`semshare_core.attention` registers calls the recorder). Retention per layer keeps
the first ``sink_tokens``, the last ``window`` tokens, and then the most attended
tokens until ``recovery`` of the mass is covered or the layer's budget
(:meth:`SemShareConfig.retention_share`) is spent. Decoding then attends only to
kept tokens; generated tokens keep their true positions (prompt length onwards).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import DynamicCache


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class AttentionRecorder:
    """Collects per-layer importance ``float32 [n]`` from the last ``window`` queries.

    Relies on the selective prefill always putting the last ``window`` prompt tokens
    at the end of each layer's query rows.
    """

    def __init__(self, n: int, window: int):
        self.n, self.window = n, window
        self.importance: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, mask, scaling) -> None:
        w = min(self.window, query.shape[2])
        q = query[:, :, -w:].float()                                   # [1, Hq, w, D]
        k = _repeat_kv(key.float(), query.shape[1] // key.shape[1])     # [1, Hq, n, D]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(2, 3)) * scale             # [1, Hq, w, n]
        if mask is not None:
            m = mask[..., -w:, :]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        else:  # causal over the last w rows of a full square prefill
            n = scores.shape[-1]
            qpos = torch.arange(n - w, n, device=scores.device)[:, None]
            scores = scores.masked_fill(torch.arange(n, device=scores.device)[None] > qpos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        self.importance[module.layer_idx] = probs.sum(dim=(0, 1, 2))


def retained_indices(importance: torch.Tensor, budget: int, recovery: float, sink: int, window: int) -> torch.Tensor:
    """Sorted int64 indices of tokens kept at one layer (``len <= max(budget, sink + window)``)."""
    n = importance.shape[0]
    if budget >= n:
        return torch.arange(n, device=importance.device)
    forced = torch.zeros(n, dtype=torch.bool, device=importance.device)
    forced[: min(sink, n)] = True
    forced[max(0, n - window):] = True
    score = importance.float().clone()
    total = float(score.sum())
    order = torch.argsort(score.masked_fill(forced, float("-inf")), descending=True)
    free = max(0, budget - int(forced.sum()))
    covered = float(score[forced].sum())
    take = 0
    csum = torch.cumsum(score[order], 0)
    if total > 0 and recovery < 1.0:
        need = recovery * total - covered
        take = int(torch.searchsorted(csum, torch.tensor(need, dtype=csum.dtype, device=csum.device))) + 1 if need > 0 else 0
    else:
        take = free
    take = min(free, max(0, take), n - int(forced.sum()))
    keep = forced.clone()
    keep[order[:take]] = True
    return torch.nonzero(keep).reshape(-1)


def pruned_cache(keys: list[torch.Tensor], values: list[torch.Tensor], kept: list[torch.Tensor] | None) -> DynamicCache:
    """A decode cache from per-layer ``[1, H, n, D]`` buffers, keeping ``kept[l]`` rows of layer ``l``."""
    cache = DynamicCache()
    for l, (k, v) in enumerate(zip(keys, values)):
        if kept is not None:
            k, v = k.index_select(2, kept[l]), v.index_select(2, kept[l])
        cache.update(k, v, l)
    return cache


def layer_budgets(n: int, num_layers: int, share: Callable[[int, int], float]) -> list[int]:
    return [max(1, math.ceil(n * share(l, num_layers))) for l in range(num_layers)]
