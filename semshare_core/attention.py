"""Attention for a selective pass: only some query rows, all prompt keys.

During a hit, layers >= 1 run on the selected rows ``S`` (sorted positions) only. Row
``S[i]`` may see key ``j`` iff ``j <= S[i]`` (and, for sliding-window models, within
the window). That is not the square causal case, so sdpa's fused ``is_causal`` path
does not apply and a plain masked call computes every ``(row, key)`` pair, the
masked-out upper part included: at 10% of rows it costs ~20% of the full causal
attention instead of ~10%.

:class:`RowPlan` is built once per selected set (not per layer): it splits ``S`` into
position-ordered chunks; chunk ``c`` attends only to keys ``[0, max(S_c)]`` with its
slice of the mask, so most of the masked-out work is skipped, while the linear layers
still run on all rows in one call. The registered attention function
(:data:`IMPL`) reads the active plan from thread-local state (set by
:func:`selective_attention`) and falls back to the model's own attention when no plan
is active (the full square pass of layer 0) — so stock decoder layers are used as is.
Key/value heads are not repeated for GQA (``enable_gqa``).

It also feeds an optional attention recorder (pruning importance, see
:mod:`semshare_core.pruning`) with the last rows' mask.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPL = "semshare_selective"
# rows per chunk below which one more sdpa call costs more than the masked work it skips
# (SmolLM2 bf16 on one CPU thread, ~1.9k keys: 80 rows were fastest in 4 chunks, 189 in 8)
MIN_CHUNK_ROWS = 20
_STATE = threading.local()


def visibility_mask(rows: torch.Tensor, width: int, sliding_window: int | None) -> torch.Tensor:
    """bool ``[1, 1, |rows|, width]``: row ``i`` sees key ``j`` iff ``j <= rows[i]`` (and within the window)."""
    keys = torch.arange(width, device=rows.device)
    allowed = keys[None, :] <= rows[:, None]
    if sliding_window is not None:
        allowed &= rows[:, None] - keys[None, :] < sliding_window
    return allowed[None, None]


@dataclass
class RowPlan:
    """How the selected rows ``rows`` (sorted int64 ``[s]``, positions in a prompt of ``n``) attend.

    ``spans``: ``(a, b, limit)``: rows ``[a, b)`` attend to keys ``[0, limit)`` with
    ``masks[c]`` ``[1, 1, b - a, limit]`` (bool, or additive 0 / -inf in ``mask_dtype``: what
    sdpa turns a bool mask into on every call, done once per plan instead of once per layer
    and chunk; the same result). ``full``: the rows are the whole prompt (use the model's
    causal attention instead). ``last_allowed``: the last chunk's mask as bool.
    """

    rows: torch.Tensor
    n: int
    spans: list[tuple[int, int, int]]
    masks: list[torch.Tensor]
    full: bool
    last_allowed: torch.Tensor | None = None

    @classmethod
    def build(cls, rows: torch.Tensor, n: int, chunks: int = 1, sliding_window: int | None = None,
              last_row: int | None = None, mask_dtype: torch.dtype | None = None) -> "RowPlan":
        """``last_row``: ``rows[-1]`` when the caller knows it; with one chunk the plan then
        reads nothing back from the device (several chunks read their bounds in one call).
        ``mask_dtype``: the queries' floating dtype, to keep additive masks (None: bool)."""
        s = int(rows.numel())
        if s == n and sliding_window is None:
            return cls(rows, n, [(0, s, n)], [], True)
        chunks = min(chunks, s // MIN_CHUNK_ROWS)
        if chunks <= 1:
            bounds = [0, s]
        else:
            bounds = sorted({round(i * s / chunks) for i in range(chunks + 1)})
        pairs = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if last_row is not None and len(pairs) == 1:
            tops = [int(last_row)]
        else:  # each chunk's last (largest) position, read back in one call
            tops = rows[torch.tensor([b - 1 for _, b in pairs], device=rows.device)].tolist()
        spans, masks, allowed = [], [], None
        for (a, b), top in zip(pairs, tops):
            limit = top + 1
            spans.append((a, b, limit))
            allowed = visibility_mask(rows[a:b], limit, sliding_window)
            if mask_dtype is None:
                masks.append(allowed)
            else:
                masks.append(torch.zeros(allowed.shape, dtype=mask_dtype, device=allowed.device)
                             .masked_fill_(~allowed, float("-inf")))
        return cls(rows, n, spans, masks, False, allowed)

    def last_rows_mask(self, w: int) -> torch.Tensor:
        """bool ``[1, 1, w', n]`` for the last ``w' = min(w, |rows|)`` rows (for the recorder)."""
        r = self.rows[-min(w, int(self.rows.numel())):]
        return visibility_mask(r, self.n, None) if self.full else self._full_width(r)

    def _full_width(self, r: torch.Tensor) -> torch.Tensor:
        last = self.last_allowed
        w = int(r.numel())
        out = torch.zeros((1, 1, w, self.n), dtype=torch.bool, device=r.device)
        out[..., : last.shape[-1]] = last[..., -w:, :]
        return out


def _planned_attention(module, query, key, value, plan: RowPlan, scaling) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for (a, b, limit), mask in zip(plan.spans, plan.masks):
        outs.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, :limit], value[:, :, :limit],
                                                   attn_mask=mask, scale=scaling, enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, Hq, s, D]
    return out.transpose(1, 2).contiguous()


def _base_attention(module) -> Callable:
    """The model's own attention function (``sdpa``, or its modeling module's eager one)."""
    name = getattr(_STATE, "base", "sdpa")
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _attention(module, query, key, value, attention_mask, **kwargs):
    plan: RowPlan | None = getattr(_STATE, "plan", None)
    if plan is None or plan.full:
        out = _base_attention(module)(module, query, key, value, attention_mask, **kwargs)
        rec_mask = attention_mask
    else:
        out = (_planned_attention(module, query, key, value, plan, kwargs.get("scaling")), None)
        rec_mask = None
    recorder = getattr(_STATE, "recorder", None)
    if recorder is not None:
        if plan is not None and not plan.full:
            rec_mask = plan.last_rows_mask(recorder.window)
        recorder(module, query, key, rec_mask, kwargs.get("scaling"))
    return out


ALL_ATTENTION_FUNCTIONS.register(IMPL, _attention)


@contextlib.contextmanager
def attention_impl(model: torch.nn.Module, impl: str):
    """``model``'s attention routed through ``impl`` (a registered name) for the duration."""
    cfg = model.config
    prev = cfg._attn_implementation
    cfg._attn_implementation = impl
    try:
        yield
    finally:
        cfg._attn_implementation = prev


class PlanHolder:
    """Sets the plan the attention function uses for the following layer calls."""

    def set(self, plan: RowPlan | None) -> None:
        _STATE.plan = plan


@contextlib.contextmanager
def selective_attention(model: torch.nn.Module, recorder: Callable | None = None) -> Iterator[PlanHolder]:
    """Route the model's attention through :data:`IMPL` for the duration (one thread at a time).

    The model's own implementation (``sdpa`` or ``eager``) handles the full square pass;
    a recorder (if any) sees every layer's attention inputs.
    """
    prev = model.config._attn_implementation
    _STATE.base = prev if prev in ("sdpa", "eager") else "sdpa"
    _STATE.recorder, _STATE.plan = recorder, None
    try:
        with attention_impl(model, IMPL):
            yield PlanHolder()
    finally:
        _STATE.recorder, _STATE.plan = None, None
