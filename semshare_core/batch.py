"""Batched decode over ragged per-request KV: one forward for every running request.

Each running request owns a :class:`SeqKV`: per decoder layer a key and a value
buffer ``[1, kv_heads, capacity, head_dim]`` of which the first ``lengths[l]`` rows are
used. Lengths differ between requests (prompt lengths) and between layers of one
request (a pruned cache keeps a different number of rows per layer). A step:

* packs the step's tokens as ``input_ids [1, B]`` with each request's true position
  (``position_ids [1, B]``: after a hit positions continue from the prompt length, not
  from a pruned row count), so every linear layer, norm and the LM head runs ONCE on
  the whole batch (decode is bandwidth-bound: reading the weights once for B tokens is
  where the gain is);
* runs the stock decoder layers with a :class:`BatchCache` whose ``update()`` appends
  each request's new K/V row to its own buffers;
* attends each request over its own rows only, in the attention function this module
  registers in transformers' ``AttentionInterface`` (:data:`IMPL`): with a native kernel
  (:mod:`semshare_core.decode_kernel`, bf16 on x86 CPUs with AVX512-BF16) one call for the
  whole batch per layer, else one SDPA call per request and layer over a view of its
  buffer (no copy, no padding; GQA through ``enable_gqa``); a sliding window restricts
  the keys to the last ``window`` positions either way.

Measured on SmolLM2-135M bf16, one CPU thread: the linear part of a decode step costs
about the same for 1 and 16 tokens (~65 ms), while one SDPA call over 100 / 1,000
keys costs ~20 / ~80 us, so padding to a common length (one call, B x max keys) would
buy little and cost a copy of every request's KV per step.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import attention_impl

IMPL = "semshare_batch"
GROW_ROWS = 64  # buffers grow by at least this many rows (amortised: no torch.cat per step)
_STATE = threading.local()


def _base(model: torch.nn.Module):
    return getattr(model, "model", model)


class SeqKV:
    """One request's decode cache.

    ``keys[l]`` / ``values[l]``: ``[1, H, capacity_l, D]``; rows ``[0, lengths[l])`` are
    used, in position order. ``position``: the position of the next token (the prompt
    length, then +1 per decoded token). ``positions[l]`` (int64 ``[capacity_l]``, only
    when ``sparse``): the position of each row, for caches whose rows are not the last
    ``lengths[l]`` positions (pruned), so a sliding window can be applied by position.
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], position: int,
                 row_positions: Sequence[torch.Tensor] | None = None, extra_rows: int = GROW_ROWS):
        self.lengths = [int(k.shape[2]) for k in keys]
        self.keys, self.values = [], []
        extra = max(1, int(extra_rows))
        for k, v in zip(keys, values):
            n = int(k.shape[2])
            kb = k.new_empty((k.shape[0], k.shape[1], n + extra, k.shape[3]))
            vb = v.new_empty((v.shape[0], v.shape[1], n + extra, v.shape[3]))
            kb[:, :, :n].copy_(k)
            vb[:, :, :n].copy_(v)
            self.keys.append(kb)
            self.values.append(vb)
        self.position = int(position)
        self.sparse = row_positions is not None
        self.positions: list[torch.Tensor] = []
        if self.sparse:
            for p, kb in zip(row_positions, self.keys):
                pb = torch.empty(kb.shape[2], dtype=torch.long, device=kb.device)
                pb[: p.numel()] = p.to(kb.device)
                self.positions.append(pb)

    @classmethod
    def from_cache(cls, cache, position: int, row_positions: Sequence[torch.Tensor] | None = None,
                   extra_rows: int = GROW_ROWS) -> "SeqKV":
        """Copy a transformers cache (``cache.layers[l].keys`` ``[1, H, len, D]``) into own buffers."""
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys, values, position, row_positions, extra_rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (capacity, not just the used rows)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def _grow(self, l: int) -> None:
        n = self.lengths[l]
        extra = max(GROW_ROWS, n // 4)
        for bufs in (self.keys, self.values):
            old = bufs[l]
            new = old.new_empty((old.shape[0], old.shape[1], old.shape[2] + extra, old.shape[3]))
            new[:, :, :n].copy_(old[:, :, :n])
            bufs[l] = new
        if self.sparse:
            old = self.positions[l]
            new = old.new_empty(old.numel() + extra)
            new[:n] = old[:n]
            self.positions[l] = new

    def reserve(self, l: int) -> int:
        """Make room for one row at layer ``l`` (position ``self.position``) and count it as
        used; returns its index. Its K/V are written by :meth:`append` or by the native kernel."""
        n = self.lengths[l]
        if n == self.keys[l].shape[2]:
            self._grow(l)
        if self.sparse:
            self.positions[l][n] = self.position
        self.lengths[l] = n + 1
        return n

    def write(self, l: int, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[l].select(2, n).copy_(k)  # select: one view op (a [:, :, n] index makes three)
        self.values[l].select(2, n).copy_(v)

    def append(self, l: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one row (``[1, H, D]``) at layer ``l``, position ``self.position``."""
        self.write(l, self.reserve(l), k, v)

    def start(self, l: int, window: int | None) -> int:
        """The first row the current token attends to at layer ``l``: 0, or the first
        within ``window`` positions (the current one included)."""
        if window is None:
            return 0
        n = self.lengths[l]
        if self.sparse:
            return int(torch.searchsorted(self.positions[l][:n], self.position - window + 1))
        return max(0, n - window)

    def rows(self, l: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[1, H, m, D]`` of the rows the current token attends to at layer ``l``
        (from :meth:`start` to the last used row)."""
        n = self.lengths[l]
        a = self.start(l, window)
        return self.keys[l].narrow(2, a, n - a), self.values[l].narrow(2, a, n - a)


class BatchCache:
    """The cache object the stock attention sees during a batched step: ``update`` appends
    the step's row of request ``i`` (``key_states[:, :, i]``) to ``seqs[i]``. With a native
    kernel that handles the layer (``q_heads``: the model's query heads, for its group size),
    ``update`` only reserves the rows and the kernel writes them in its attention call
    (:attr:`pending`; :meth:`flush` writes them if it refuses the layer)."""

    def __init__(self, seqs: Sequence[SeqKV], kernel=None, q_heads: int | None = None):
        self.seqs = list(seqs)
        self.kernel = kernel
        self.q_heads = q_heads
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.touched = False  # set by the first update: the requests' caches have changed

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.touched = True
        kern = self.kernel
        if (kern is not None and self.q_heads is not None and key_states.stride(-1) == 1
                and value_states.stride(-1) == 1
                and kern.handles_shape(value_states.dtype, key_states.dtype, key_states.device, key_states.shape[-1],
                                       self.q_heads, key_states.shape[1])):
            for s in self.seqs:
                s.reserve(layer_idx)
            self.pending[layer_idx] = (key_states, value_states)
            return key_states, value_states
        # unbind: B row views [1, H, D] in one op each (B narrows cost ~2.5x as much per layer)
        for s, k, v in zip(self.seqs, key_states.unbind(2), value_states.unbind(2)):
            s.append(layer_idx, k, v)
        return key_states, value_states

    def flush(self, layer_idx: int) -> None:
        """Write reserved rows the kernel did not take (it refused the layer): Python appends."""
        rows = self.pending.pop(layer_idx, None)
        if rows is not None:
            for s, k, v in zip(self.seqs, rows[0].unbind(2), rows[1].unbind(2)):
                s.write(layer_idx, s.lengths[layer_idx] - 1, k, v)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((s.lengths[layer_idx] for s in self.seqs), default=0)

    @property
    def is_compileable(self) -> bool:
        return False


def _ragged_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
    """query ``[1, Hq, B, D]``: request ``i`` attends over ``seqs[i]``'s own rows. Returns ``[1, B, Hq, D]``.
    With a native kernel for the step (:mod:`semshare_core.decode_kernel`), one call for the
    whole batch where it handles the shapes; otherwise one SDPA call per request."""
    cache: BatchCache = _STATE.cache
    l = module.layer_idx
    Hq = query.shape[1]
    kernel = _STATE.kernel
    seqs = cache.seqs
    if (kernel is not None and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
            and kernel.handles(query, seqs[0].keys[l])):
        new = cache.pending.get(l)
        with torch.profiler.record_function("semshare::decode_attention"):
            out = kernel.attend(query, [s.keys[l] for s in seqs], [s.values[l] for s in seqs],
                                [s.start(l, sliding_window) for s in seqs], [s.lengths[l] for s in seqs],
                                scaling if scaling is not None else query.shape[-1] ** -0.5,
                                *(new if new is not None else ()))
        if out is not None:
            cache.pending.pop(l, None)
            return out, None
    cache.flush(l)  # rows reserved for the kernel, which did not run: write them here
    outs = []
    for s, q in zip(cache.seqs, query.split(1, dim=2)):  # q [1, Hq, 1, D]: B views in one op
        k, v = s.rows(l, sliding_window)
        outs.append(F.scaled_dot_product_attention(q, k, v, scale=scaling,
                                                   enable_gqa=Hq != k.shape[1]))  # [1, Hq, 1, D]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)               # [1, Hq, B, D]
    return out.transpose(1, 2), None                                          # [1, B, Hq, D]


ALL_ATTENTION_FUNCTIONS.register(IMPL, _ragged_attention)


@contextlib.contextmanager
def batched_attention(model: torch.nn.Module, cache: BatchCache, kernel=None, impl: str = IMPL) -> Iterator[None]:
    """Route the model's attention through ``impl`` (:data:`IMPL`, or the compiled step's)
    for one step (one thread at a time)."""
    _STATE.cache, _STATE.kernel = cache, kernel
    try:
        with attention_impl(model, impl):
            yield
    finally:
        _STATE.cache = _STATE.kernel = None


@torch.no_grad()
def batch_step(model: torch.nn.Module, seqs: Sequence[SeqKV], tokens: Sequence[int], kernel=None) -> torch.Tensor:
    """One decode step for every request: feed ``tokens[i]`` to ``seqs[i]`` at its position.

    Returns float32 logits ``[B, vocab]``; each ``seqs[i]`` gains one row per layer and
    its ``position`` advances by one. ``kernel``: a :class:`semshare_core.decode_kernel.DecodeKernel`
    for the attention (None: SDPA).
    """
    from .prefill import cache_kwarg, decoder_layers, run_layers

    base = _base(model)
    dev = base.embed_tokens.weight.device
    ids = torch.tensor([list(tokens)], device=dev)
    pos = torch.tensor([[s.position for s in seqs]], device=dev)
    cache = BatchCache(seqs, kernel, getattr(model.config, "num_attention_heads", None))
    with batched_attention(model, cache, kernel):
        hidden = run_layers(model, ids, pos, cache, cache_kwarg(decoder_layers(model)[0].forward))  # [1, B, hidden]
    logits = model.lm_head(base.norm(hidden))[0].float()                   # [B, vocab]
    for s in seqs:
        s.position += 1
    return logits
