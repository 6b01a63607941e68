"""Prefill drivers: the plain one (what ``generate`` does) and the selective-recompute one.

Selective recompute (a hit), given target ids ``[n]`` and the reference KV gathered in
target order with keys re-rotated to target positions, ``ref_kv [L, 2, H, n, D]``:

* layer 0 runs on all n tokens. Its own K/V cannot rank tokens (they depend only on
  token and position, so every exactly matched token deviates by ~0), so the deviation
  is taken one layer later: layer 1's K/V projections of layer 0's output (cheap, no
  attention) vs the reused layer-1 K/V, ``||K1 - K1_ref|| + ||V1 - V1_ref||``. The
  ``recompute_share(1) * n`` highest-deviation tokens, plus every unmatched token and
  the last ``window`` tokens, form the set ``S``; tokens whose relative deviation is
  below ``deviation_tol`` (their context is unchanged, e.g. a shared prefix) are left
  out even if the budget allows them (except at ratio 1.0, which recomputes all);
* layers 1..L-1 run the stock decoder layer on ``hidden[:, S]`` only, with
  ``position_ids = S``, a :class:`ScatterCache` whose ``update`` writes the new K/V of
  ``S`` into the reused buffer and returns all n rows, and a mask where query ``S[i]``
  sees key ``j`` iff ``j <= S[i]``. If the schedule shrinks, ``S`` keeps its
  highest-deviation members (deviation measured at the previous layer);
* the last token is always in ``S``: its hidden state gives the first logits.

Nothing runs a full prefill of the target afterwards; the buffers are the prompt's
KV (for decode and for registration).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from .config import SemShareConfig
from .pruning import AttentionRecorder, recording


def decoder_layers(model: torch.nn.Module):
    return getattr(model, "model", model).layers


def _base(model: torch.nn.Module):
    return getattr(model, "model", model)


def cache_kwarg(fn) -> str:
    """transformers >= 5.20 calls the cache argument ``cache``, older 5.x ``past_key_values``."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def relative_deviation(k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """Per token ``(||K - K_ref|| + ||V - V_ref||) / (||K_ref|| + ||V_ref||)`` over heads and dims: ``[seq]``.

    Inputs ``[1, H, seq, D]``. Zero when the token's context is unchanged.
    """
    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.float().pow(2).sum(dim=(0, 1, 3)).sqrt()

    return (norm(k.float() - k_ref.float()) + norm(v.float() - v_ref.float())) / (norm(k_ref) + norm(v_ref) + 1e-12)


class ScatterCache:
    """Cache seen by the stock attention during a selective pass.

    Holds per-layer full buffers ``keys[l]``/``values[l]`` ``[1, H, n, D]`` (the reused,
    re-rotated KV). ``rows`` (int64 ``[|S|]``) are the tokens being recomputed;
    ``update`` scatters their fresh K/V into the buffers, records each row's deviation
    from the reused K/V (``deviation`` ``[|S|]``), and returns the full buffers.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.rows: torch.Tensor | None = None
        self.deviation: torch.Tensor | None = None
        self.limit: int | None = None  # return only keys [0, limit): all the rows' queries can see

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        kb, vb, rows = self.keys[layer_idx], self.values[layer_idx], self.rows
        self.deviation = relative_deviation(key_states, value_states, kb[:, :, rows], vb[:, :, rows])
        kb[:, :, rows] = key_states.to(kb.dtype)
        vb[:, :, rows] = value_states.to(vb.dtype)
        if self.limit is not None:
            return kb[:, :, :self.limit], vb[:, :, :self.limit]
        return kb, vb

    # transformers may ask these of any cache object
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys[layer_idx].shape[2])

    @property
    def is_compileable(self) -> bool:
        return False


@dataclass
class SelectiveOutput:
    """Result of :func:`selective_prefill`.

    ``logits``: float32 ``[vocab]`` for the last prompt token; ``keys``/``values``: per
    layer ``[1, H, n, D]`` (the prompt's KV, reused rows + recomputed rows);
    ``rows_per_layer``: tokens each decoder layer processed; ``importance``: per-layer
    ``[n]`` attention mass (only when recorded).
    """

    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rows_per_layer: list[int]
    importance: list[torch.Tensor] | None = None
    layer0_deviation: torch.Tensor | None = field(default=None, repr=False)


def _visibility_mask(rows: torch.Tensor, n: int, impl: str, dtype: torch.dtype,
                     sliding_window: int | None) -> torch.Tensor | None:
    """Mask ``[1, 1, |rows|, n]``: row ``i`` sees key ``j`` iff ``j <= rows[i]`` (and within the window)."""
    if rows.numel() == n and sliding_window is None and impl == "sdpa":
        return None  # the full square causal case: sdpa's is_causal fast path
    keys = torch.arange(n, device=rows.device)
    allowed = keys[None, :] <= rows[:, None]
    if sliding_window is not None:
        allowed &= rows[:, None] - keys[None, :] < sliding_window
    allowed = allowed[None, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=rows.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _next_layer_kv_deviation(model: torch.nn.Module, layer: torch.nn.Module, hidden: torch.Tensor,
                             buffers: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor,
                             sin: torch.Tensor) -> torch.Tensor | None:
    """Deviation of every token's *next-layer* K/V from the reused K/V: ``[n]``.

    Layer-0 K/V depend only on token and position, so after re-rotation they are
    identical for every exactly matched token and rank nothing. The K/V that layer 1
    would compute (from layer 0's output, which has attended to the new context) is the
    first place a token's context shows; only its input norm and K/V projections are
    run (no attention, no MLP). Returns None for decoders without the Llama layout.
    """
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "input_layernorm", None)
    if attn is None or norm is None or not hasattr(attn, "k_proj") or hasattr(attn, "k_norm"):
        return None
    from .rope import apply_rotary_fn

    x = norm(hidden)
    kb, vb = buffers
    shape = (1, hidden.shape[1], -1, kb.shape[-1])
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    _, k = apply_rotary_fn(model)(k, k, cos, sin)
    return relative_deviation(k, v, kb, vb)


def _chunks(count: int, chunks: int, window: int) -> list[tuple[int, int]]:
    """Split ``count`` sorted rows into up to ``chunks`` contiguous ranges; the last keeps >= ``window`` rows."""
    if chunks <= 1 or count <= 2 * window:
        return [(0, count)]
    bounds = sorted({round(i * count / chunks) for i in range(chunks)} | {count})
    bounds = [b for b in bounds if b <= count - window] + [count]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run_layer_chunked(layer, hidden: torch.Tensor, rows: torch.Tensor, n: int, cache: ScatterCache, ckw: str,
                       cos: torch.Tensor, sin: torch.Tensor, impl: str, sliding: int | None,
                       chunks: int, window: int) -> torch.Tensor:
    """Run one decoder layer on the rows ``rows`` (sorted), in position-ordered chunks.

    Chunk ``c`` attends only to keys ``[0, max(rows_c)]``: earlier chunks' fresh K/V are
    already scattered, later rows are not visible to it anyway, so the result equals one
    call over all rows while skipping the masked-out upper part of the attention.
    """
    outs, devs = [], []
    spans = _chunks(int(rows.numel()), chunks, window) if rows.numel() < n else [(0, int(rows.numel()))]
    for a, b in spans:
        r = rows[a:b]
        cache.rows = r
        cache.limit = int(r[-1]) + 1 if len(spans) > 1 else None
        width = cache.limit or n
        mask = _visibility_mask(r, width, impl, hidden.dtype, sliding)
        outs.append(layer(hidden[:, a:b], attention_mask=mask, position_ids=r[None],
                          position_embeddings=(cos[:, r], sin[:, r]), **{ckw: cache}))
        devs.append(cache.deviation)
    cache.limit = None
    cache.deviation = devs[0] if len(devs) == 1 else torch.cat(devs)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _select(rows: torch.Tensor, deviation: torch.Tensor, forced: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Positions (into ``rows``) of the ``k`` highest-deviation rows plus all forced ones, in order.

    Rows deviating less than ``tol`` (relative) are dropped unless forced.
    """
    candidate = forced | (deviation >= tol)
    if k >= rows.numel() and bool(candidate.all()):
        return torch.arange(rows.numel(), device=rows.device)
    score = deviation.float().masked_fill(forced, float("inf")).masked_fill(~candidate, float("-inf"))
    k = min(max(k, int(forced.sum())), int(candidate.sum()))
    top = torch.topk(score, k).indices
    return torch.sort(top).values


@torch.no_grad()
def selective_prefill(model: torch.nn.Module, ids: torch.Tensor, ref_kv: torch.Tensor, must_recompute: torch.Tensor,
                      cfg: SemShareConfig, record_attention: bool = False) -> SelectiveOutput:
    """Prefill ``ids`` ``[n]`` reusing ``ref_kv`` ``[L, 2, H, n, D]`` (modified in place).

    ``must_recompute``: bool ``[n]``, tokens without a usable reference row.
    """
    base = _base(model)
    layers = decoder_layers(model)
    n, L = int(ids.shape[0]), len(layers)
    dev = ref_kv.device
    impl = model.config._attn_implementation
    impl = impl if impl in ("sdpa", "eager") else "sdpa"
    sliding = getattr(model.config, "sliding_window", None)
    sliding = sliding if sliding and sliding < n else None
    ckw = cache_kwarg(layers[0].forward)
    cache = ScatterCache([ref_kv[l, 0].unsqueeze(0) for l in range(L)], [ref_kv[l, 1].unsqueeze(0) for l in range(L)])
    hidden = base.embed_tokens(ids.to(dev)[None])                         # [1, n, hidden]
    positions = torch.arange(n, device=dev)
    cos, sin = base.rotary_emb(hidden, positions[None])
    forced_all = must_recompute.to(dev).clone()
    forced_all[max(0, n - cfg.window):] = True
    rows = positions
    rows_per_layer: list[int] = []
    recorder = AttentionRecorder(n, cfg.window) if record_attention else None
    layer0_dev = None
    with recording(model, recorder):
        for l, layer in enumerate(layers):
            hidden = _run_layer_chunked(layer, hidden, rows, n, cache, ckw, cos, sin, impl, sliding,
                                        cfg.attention_chunks, cfg.window)
            rows_per_layer.append(int(rows.numel()))
            deviation = cache.deviation
            if l == 0:
                layer0_dev = deviation.clone()
                if L > 1:
                    probe = _next_layer_kv_deviation(model, layers[1], hidden, (cache.keys[1], cache.values[1]), cos, sin)
                    deviation = probe if probe is not None else deviation
            if l + 1 < L:
                k = math.ceil(cfg.recompute_share(l + 1) * n)
                tol = cfg.deviation_tol if cfg.recompute_ratio < 1.0 else 0.0
                keep = _select(rows, deviation, forced_all[rows], k, tol)
                if keep.numel() < rows.numel():
                    rows, hidden = rows[keep], hidden[:, keep]
        last = base.norm(hidden[:, -1:])
        logits = model.lm_head(last)[0, -1].float()
    importance = None
    if recorder is not None:
        importance = [recorder.importance[l] for l in range(L)]
    return SelectiveOutput(logits, cache.keys, cache.values, rows_per_layer, importance, layer0_dev)


@torch.no_grad()
def full_prefill(model: torch.nn.Module, ids: torch.Tensor):
    """Exactly what ``generate`` does for the prompt: returns ``(logits float32 [vocab], DynamicCache)``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids.reshape(1, -1).to(model.device), use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model.forward): cache})
    return out.logits[0, -1].float(), cache


@torch.no_grad()
def model_step(model: torch.nn.Module, token: int, cache) -> torch.Tensor:
    """One decode step through ``model.forward`` (positions from the cache length)."""
    ids = torch.tensor([[token]], device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model.forward): cache})
    return out.logits[0, -1].float()


@torch.no_grad()
def layer_step(model: torch.nn.Module, token: int, position: int, cache) -> torch.Tensor:
    """One decode step through the decoder layers with an explicit position.

    For caches whose per-layer lengths differ from the prompt length (pruned): the new
    token sits at ``position`` (the true prompt length onwards), attends to every row
    its layer's cache holds, and is appended to it.
    """
    base = _base(model)
    layers = decoder_layers(model)
    ckw = cache_kwarg(layers[0].forward)
    dev = base.embed_tokens.weight.device
    hidden = base.embed_tokens(torch.tensor([[token]], device=dev))
    pos = torch.tensor([[position]], device=dev)
    pe = base.rotary_emb(hidden, pos)
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe, **{ckw: cache})
    return model.lm_head(base.norm(hidden))[0, -1].float()
