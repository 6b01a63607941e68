"""Prefill drivers: the plain one (what ``generate`` does) and the selective-recompute one.

Selective recompute (a hit), given target ids ``[n]`` and the reference KV gathered in
target order with keys re-rotated to target positions, ``ref_kv [L, 2, H, n, D]``:

* layer 0 runs on all n tokens. Its own K/V cannot rank tokens (they depend only on
  token and position, so every exactly matched token deviates by ~0), so a *probe*
  runs layer 1's input norm and K/V projections on layer 0's output (no attention, no
  MLP; counted in ``probe_rows``): each token's relative deviation
  ``(||K1 - K1_ref|| + ||V1 - V1_ref||) / (||K1_ref|| + ||V1_ref||)`` and, for the
  query-aware rules, the attention the last ``window`` queries of layer 1 put on it;
* ``S`` = the forced tokens (unmatched ones and the last ``window``) plus the
  best-scored others under the selection rule (``SemShareConfig.selection``), up to
  ``ceil(recompute_share(1) * n)`` in all: forced tokens count inside that budget and
  exceed it only when there are more of them. Tokens whose deviation is below
  ``deviation_tol`` (unchanged context, e.g. a shared prefix) are never selected unless
  forced (ratio 1.0 recomputes all);
* layers 1..L-1 run the stock decoder layer on ``hidden[:, S]`` only, with
  ``position_ids = S``, a :class:`ScatterCache` whose ``update`` writes the new K/V of
  ``S`` into the reused buffer and returns all n rows, and attention where query
  ``S[i]`` sees key ``j`` iff ``j <= S[i]`` (:mod:`semshare_core.attention`: position-
  ordered chunks, each over the keys it can see; masks built once per ``S``). If the
  schedule shrinks, ``S`` keeps its best members (rule ``deviation``: deviation
  measured at the previous layer; other rules: the probe's score);
* the last token is always in ``S``: its hidden state gives the first logits.

Nothing runs a full prefill of the target afterwards; the buffers are the prompt's
KV (for decode and for registration).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .config import SemShareConfig
from .families import family_of
from .pruning import AttentionRecorder
from .staging import ImmediateFeed


def decoder_layers(model: torch.nn.Module):
    return getattr(model, "model", model).layers


def _base(model: torch.nn.Module):
    return getattr(model, "model", model)


def cache_kwarg(fn) -> str:
    """transformers >= 5.20 calls the cache argument ``cache``, older 5.x ``past_key_values``."""
    return _cache_kwarg(getattr(fn, "__func__", fn))  # asked every decode step: inspect once per function


@functools.lru_cache(maxsize=64)
def _cache_kwarg(fn) -> str:
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
    re-rotated KV). ``rows`` (int64 ``[|S|]``) are the tokens being recomputed (``full``:
    all of them, in order); ``update`` writes their fresh K/V into the buffers and
    returns the full buffers. When ``want_deviation`` is set it first records each
    row's relative deviation from the reused K/V (``deviation`` ``[|S|]``); it is only
    set where a selection decision uses it.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.rows: torch.Tensor | None = None
        self.full = False
        self.want_deviation = False
        self.deviation: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        kb, vb, rows = self.keys[layer_idx], self.values[layer_idx], self.rows
        if self.full:
            if self.want_deviation:
                self.deviation = relative_deviation(key_states, value_states, kb, vb)
            kb.copy_(key_states)
            vb.copy_(value_states)
        else:
            if self.want_deviation:
                self.deviation = relative_deviation(key_states, value_states, kb[:, :, rows], vb[:, :, rows])
            kb.index_copy_(2, rows, key_states.to(kb.dtype))
            vb.index_copy_(2, rows, value_states.to(vb.dtype))
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
    ``rows_per_layer``: tokens each decoder layer processed; ``probe_rows``: rows the
    selection probe computed on top (layer 1's K/V projections of every token);
    ``importance``: per-layer ``[n]`` attention mass (only when recorded).
    """

    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rows_per_layer: list[int]
    importance: list[torch.Tensor] | None = None
    probe_rows: int = 0


@dataclass
class Probe:
    """What the selection probe measured after layer 0, per token ``[n]``.

    ``deviation``: relative deviation of the token's layer-1 K/V (computed from layer
    0's output) from the reused layer-1 K/V. ``attention``: attention mass the last
    ``window`` queries put on the token at layer 1, with fresh keys (query-aware);
    None unless the selection rule uses it.
    """

    deviation: torch.Tensor
    attention: torch.Tensor | None = None


def _probe_supported(layer: torch.nn.Module) -> bool:
    """Llama layout: ``input_layernorm`` and separate ``q_proj``/``k_proj``/``v_proj`` (biased or
    not: Qwen2), optionally with per-head ``q_norm``/``k_norm`` before RoPE (Qwen3)."""
    attn = getattr(layer, "self_attn", None)
    return (attn is not None and hasattr(layer, "input_layernorm")
            and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))
            and hasattr(attn, "q_norm") == hasattr(attn, "k_norm"))


def _heads(proj: torch.nn.Module, norm: torch.nn.Module | None, x: torch.Tensor, d: int) -> torch.Tensor:
    """``proj(x)`` as ``[1, heads, seq, d]``, the per-head norm (Qwen3 ``q_norm``/``k_norm``) applied
    before the transpose, as the stock attention does."""
    h = proj(x).view(1, x.shape[1], -1, d)
    if norm is not None:
        h = norm(h)
    return h.transpose(1, 2)


def probe_runs(model: torch.nn.Module, cfg: SemShareConfig) -> bool:
    """Whether a hit ranks its rows with the layer-1 probe (then layer 0 runs on every row
    and its reused K/V is never read): several layers, a Llama-style layer 1, a recompute
    ratio below 1."""
    layers = decoder_layers(model)
    return cfg.recompute_ratio < 1.0 and len(layers) > 1 and _probe_supported(layers[1])


def _probe_next_layer(model: torch.nn.Module, layer: torch.nn.Module, hidden: torch.Tensor,
                      buffers: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                      window: int, want_attention: bool) -> Probe | None:
    """Run layer 1's input norm and projections (no attention output, no MLP) on every token.

    Layer-0 K/V depend only on token and position, so after re-rotation they are
    identical for every exactly matched token and rank nothing; the K/V layer 1 would
    compute (from layer 0's output, which has attended to the new context) is the first
    place a token's context shows. With ``want_attention`` the last ``window`` queries
    of layer 1 are scored against those fresh keys as well. Qwen3's per-head
    ``q_norm``/``k_norm`` are applied as its attention does. Returns None for decoders
    without the Llama layout.
    """
    if not _probe_supported(layer):
        return None
    from .rope import apply_rotary_fn

    attn, norm = layer.self_attn, layer.input_layernorm

    rotate = apply_rotary_fn(model)
    x = norm(hidden)
    kb, vb = buffers
    n, d = hidden.shape[1], kb.shape[-1]
    k = _heads(attn.k_proj, getattr(attn, "k_norm", None), x, d)
    v = _heads(attn.v_proj, None, x, d)
    _, k = rotate(k, k, cos, sin)
    probe = Probe(relative_deviation(k, v, kb, vb))
    if want_attention:
        w = min(window, n)
        q = _heads(attn.q_proj, getattr(attn, "q_norm", None), x[:, n - w:], d)     # [1, Hq, w, D]
        q, _ = rotate(q, q, cos[:, n - w:], sin[:, n - w:])
        groups = q.shape[1] // k.shape[1]
        kk = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
        scores = torch.matmul(q.float(), kk.transpose(2, 3)) * attn.scaling        # [1, Hq, w, n]
        future = torch.arange(n, device=k.device)[None] > torch.arange(n - w, n, device=k.device)[:, None]
        probe.attention = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).sum(dim=(0, 1, 2))
    return probe


def selection_score(rule: str, probe: Probe, n: int, seed: int) -> torch.Tensor:
    """Per-token score ``[n]`` (higher = recompute first) of a selection rule.

    ``deviation``: layer-1 K/V deviation (CacheBlend-style). ``attention``: attention of
    the prompt's last queries at layer 1 (query-aware, ProphetKV-style). ``blend``:
    their product, deviation weighted by how much the query reads the token.
    ``random`` and ``positional`` (latest tokens first) are controls.
    """
    dev = probe.deviation.float()
    if rule == "deviation":
        return dev
    if rule == "attention":
        return probe.attention.float()
    if rule == "blend":
        return dev * probe.attention.float()
    if rule == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, generator=g).to(dev.device)
    if rule == "positional":
        return torch.arange(n, dtype=torch.float32, device=dev.device)
    raise ValueError(f"unknown selection rule {rule!r}")


def _select(score: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, k: int,
            n_forced: int | None = None, n_eligible: int | None = None, fill: bool = False) -> torch.Tensor:
    """Sorted positions (into the current rows) to keep: all ``forced``, then the best-scored candidates.

    ``k`` is the budget; forced rows count inside it (they exceed it only when there
    are more forced rows than ``k``). Non-candidates (unchanged context) are never kept
    unless forced, or unless ``fill``: then exactly ``min(max(k, forced), rows)`` rows are
    kept, non-candidates (best-scored first) after every candidate (``row_bucket``).
    ``n_forced`` / ``n_eligible`` (forced rows; forced-or-candidate rows) may be given by
    a caller that knows them, so the call reads nothing back from the device (no host
    sync on an accelerator).
    """
    candidate = candidate | forced
    n_forced = int(forced.sum()) if n_forced is None else n_forced
    if fill:
        n_eligible = int(score.numel())
    elif n_eligible is None:
        n_eligible = int(candidate.sum())
    k = min(max(k, n_forced), n_eligible)
    if k >= score.numel():
        return torch.arange(score.numel(), device=score.device)
    s = score.float()
    ranked = s.masked_fill(forced, float("inf"))
    if fill:  # fillers rank below every candidate: shift them by more than the scores' spread
        ranked = torch.where(candidate, ranked, s - (2 * s.abs().amax() + 1))
    else:
        ranked = ranked.masked_fill(~candidate, float("-inf"))
    return torch.sort(torch.topk(ranked, k).indices).values


@torch.no_grad()
def selective_prefill(model: torch.nn.Module, ids: torch.Tensor, ref_kv, must_recompute: torch.Tensor,
                      cfg: SemShareConfig, record_attention: bool = False, compiled=None) -> SelectiveOutput:
    """Prefill ``ids`` ``[n]`` reusing ``ref_kv`` ``[L, 2, H, n, D]`` (modified in place: it becomes the prompt's KV).

    ``ref_kv`` is a tensor (gathered and re-rotated) or a feed that fills its ``buffer``
    layer by layer (:class:`semshare_core.staging.LayerFeed`): ``stage(l)`` starts
    layer ``l``'s fetch, ``ready(l)`` is called before anything reads layer ``l``, and
    ``finish()`` on the way out, also on an exception.
    ``must_recompute``: bool ``[n]``, tokens without a usable reference row (always
    recomputed, with the last ``window`` tokens).
    ``compiled``: a :class:`~semshare_core.compiled_selective.CompiledSelective` to run
    the decoder layers through (not with ``record_attention``); None: eager.
    """
    from .attention import RowPlan, selective_attention

    base = _base(model)
    layers = decoder_layers(model)
    n, L = int(ids.shape[0]), len(layers)
    feed = ref_kv if hasattr(ref_kv, "ready") else ImmediateFeed(ref_kv)
    ref_kv = feed.buffer
    dev = ref_kv.device
    sliding = family_of(model).sliding_window  # refuses what the loop cannot do exactly
    sliding = sliding if sliding and sliding < n else None
    ckw = cache_kwarg(layers[0].forward)
    cache = ScatterCache([ref_kv[l, 0].unsqueeze(0) for l in range(L)], [ref_kv[l, 1].unsqueeze(0) for l in range(L)])
    hidden = base.embed_tokens(ids.to(dev)[None])                         # [1, n, hidden]
    positions = torch.arange(n, device=dev)
    cos, sin = base.rotary_emb(hidden, positions[None])
    forced_all = must_recompute.to(dev).clone()
    forced_all[max(0, n - cfg.window):] = True
    n_forced = int(forced_all.sum())
    everything = cfg.recompute_ratio >= 1.0
    rule = cfg.selection
    rows = positions
    rows_per_layer: list[int] = []
    recorder = AttentionRecorder(n, cfg.window) if record_attention else None
    probe_rows = 0
    score = candidate = None

    def plan_for(r: torch.Tensor):
        # the last token is always recomputed (window >= 1), so the last row is n - 1
        return (RowPlan.build(r, n, cfg.chunks_for(dev, int(r.numel())), sliding, last_row=n - 1,
                              mask_dtype=hidden.dtype),
                (cos[:, r], sin[:, r]))

    probe_ok = L > 1 and _probe_supported(layers[1])
    use_compiled = compiled is not None and recorder is None
    fill = cfg.row_bucket > 1
    plan, pe = plan_for(rows)
    with selective_attention(model, recorder) as attention, feed:
        feed.stage(0)
        feed.stage(1)
        for l, layer in enumerate(layers):
            k = cfg.layer_budget(l + 1, n, n_forced) if l + 1 < L else 0
            if fill and l >= 1:  # whole buckets (or every row left): layer 1's rows were bucketed
                k = cfg.bucketed(min(max(k, n_forced), int(rows.numel())), n)
            shrink_by_deviation = l >= 1 and rule == "deviation" and k < rows.numel()
            cache.rows, cache.full = rows, rows.numel() == n
            cache.want_deviation = shrink_by_deviation or (l == 0 and not probe_ok and not everything)
            attention.set(plan)
            feed.ready(l)
            out = compiled.layer(layer, l, hidden, pe, cache, plan) if use_compiled and compiled.active else None
            hidden = out if out is not None else layer(hidden, attention_mask=None, position_ids=rows[None],
                                                       position_embeddings=pe, **{ckw: cache})
            feed.stage(l + 2)  # the host gathers layer l+2 while the device runs layer l
            rows_per_layer.append(int(rows.numel()))
            if l + 1 == L or everything:
                continue
            if l == 0:
                if probe_ok:
                    feed.ready(1)
                    probe = _probe_next_layer(model, layers[1], hidden, (cache.keys[1], cache.values[1]), cos, sin,
                                              cfg.window, rule in ("attention", "blend"))
                    probe_rows = n
                else:  # not a Llama-style layer: rank on layer 0's own deviation
                    probe = Probe(cache.deviation)
                    rule = "deviation" if rule in ("attention", "blend") else rule
                score = selection_score(rule, probe, n, cfg.seed)
                candidate = probe.deviation >= cfg.deviation_tol
                if fill:  # round the rows worth recomputing up to whole buckets, not the budget
                    eligible = int((candidate | forced_all).sum())  # the hit's one read-back
                    k = cfg.bucketed(min(max(k, n_forced), eligible), n)
                keep = _select(score, candidate, forced_all, k, n_forced, fill=fill)  # (or this one's)
            elif k < rows.numel():
                # every kept row is forced or a candidate, and every forced row is kept: both
                # counts are known here, so a deeper layer's selection never waits on the device
                current = cache.deviation if shrink_by_deviation else score[rows]
                keep = _select(current, candidate[rows], forced_all[rows], k, n_forced, int(rows.numel()), fill)
            else:
                continue
            if keep.numel() < rows.numel():
                rows, hidden = rows[keep], hidden[:, keep]
                plan, pe = plan_for(rows)
        last = base.norm(hidden[:, -1:])
        logits = model.lm_head(last)[0, -1].float()
    importance = None
    if recorder is not None:
        importance = [recorder.importance[l] for l in range(L)]
    return SelectiveOutput(logits, cache.keys, cache.values, rows_per_layer, importance, probe_rows)


def full_length_cache():
    """A ``DynamicCache`` whose layers keep every row (no sliding-window layers): see :func:`full_prefill`."""
    from transformers import DynamicCache

    return DynamicCache()


@torch.no_grad()
def full_prefill(model: torch.nn.Module, ids: torch.Tensor, cache=None):
    """Exactly what ``generate`` does for the prompt: returns ``(logits float32 [vocab], DynamicCache)``.

    With ``cache`` (holding the prompt's earlier tokens) ``ids`` is the next chunk. A new
    cache is built without the config, so every layer keeps all n rows even with a
    sliding window (``DynamicCache(config=...)`` would keep only the last ``window - 1``
    rows of a sliding layer, and the prompt could not be exported). The window is still
    applied: the model builds its sliding-window mask from the config, in the prefill
    and in every later decode step.
    """
    cache = full_length_cache() if cache is None else cache
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
    dev = base.embed_tokens.weight.device
    pos = torch.tensor([[position]], device=dev)
    hidden = run_layers(model, torch.tensor([[token]], device=dev), pos, cache,
                        cache_kwarg(decoder_layers(model)[0].forward))
    return model.lm_head(base.norm(hidden))[0, -1].float()


def run_layers(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, cache, ckw: str) -> torch.Tensor:
    """Embed ``ids [1, n]`` and run every decoder layer at explicit positions ``pos [1, n]``
    against ``cache`` (passed as keyword ``ckw``, see :func:`cache_kwarg`); returns the last
    layer's hidden states ``[1, n, hidden]`` (before the final norm). No mask: the attention
    function in use decides what each row sees."""
    base = _base(model)
    hidden = base.embed_tokens(ids)
    pe = base.rotary_emb(hidden, pos)
    for layer in decoder_layers(model):
        hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe, **{ckw: cache})
    return hidden
