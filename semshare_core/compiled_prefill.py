"""A full prefill (or one chunk of it) compiled as one graph (``torch.compile``, inductor).

On one CPU core a ~1k-token bf16 full prefill of SmolLM2 spends about a third of its time
outside the matmuls and attention, in unfused bf16 elementwise ops (norms, rotary, SiLU,
residuals, dtype round trips). Compiled with inductor (frozen weights, fused elementwise
chains) the same prefill took ~0.7x the eager time in a one-off trial; vLLM-CPU compiles
its whole model for the same reason. As with :mod:`semshare_core.compiled_decode`, the
stock decoder layers are traced as they are, and what holds state stays eager:

* each layer's attention, with the append of the chunk's K/V to the prompt's
  ``DynamicCache`` (the same cache :func:`semshare_core.prefill.full_prefill` fills, so
  export, decode and chunking work on it unchanged), is ONE opaque custom op
  (``semshare::prefill_attention``): SDPA over the cache's rows, causal (bottom-right
  aligned for a chunk after earlier chunks), with the model's sliding window;
* the chunk length is dynamic (one graph for every length >= 2); a one-token chunk runs
  eagerly.

Used for bf16 on a CPU with a C++ compiler (``mode="auto"``), forced by ``"on"``, never
with ``"off"``. A hit's decoder layers have their own graph under the same setting
(:mod:`semshare_core.compiled_selective`). A compiled bf16 prefill rounds
differently from ``generate``'s (float32 kept between fused ops); float32 models keep the
eager path under ``auto``. A failure while tracing or compiling, before the cache changed,
logs once and falls back to the eager prefill for good.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch
import torch.nn.functional as F

from .attention import attention_impl
from .compiled_common import CompiledPass, fake_output, register_attention

logger = logging.getLogger(__name__)

IMPL = "semshare_prefill_compiled"
_STATE = threading.local()


@torch.library.custom_op("semshare::prefill_attention", mutates_args=())
def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float,
                      window: int) -> torch.Tensor:
    """One layer of a prefill chunk (opaque to the compiler): appends the chunk's K/V
    ``[1, Hkv, c, D]`` to the thread's current prompt cache and attends ``query [1, Hq, c, D]``
    over all its rows ``[1, Hkv, past + c, D]``, causally, within ``window`` (0 = none).
    Returns ``[1, c, Hq, D]``."""
    _STATE.touched = True
    k_all, v_all = _STATE.cache.update(key, value, layer)
    c, n = query.shape[2], k_all.shape[2]
    gqa = query.shape[1] != k_all.shape[1]
    if n == c and (window <= 0 or window >= n):
        out = F.scaled_dot_product_attention(query, k_all, v_all, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # after earlier chunks, or a window shorter than the rows: an explicit mask
        out = F.scaled_dot_product_attention(query, k_all, v_all, attn_mask=_chunk_mask(c, n, window, query),
                                             scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _chunk_mask(c: int, n: int, window: int, query: torch.Tensor) -> torch.Tensor:
    """Additive mask ``[c, n]`` (0 / -inf in the queries' dtype) of the last ``c`` of ``n``
    rows attending causally (within ``window``, 0 = none). Every layer of a chunk asks for
    the same one, so it is built once and kept (one per thread) until another shape asks:
    building it per layer (and sdpa turning a bool mask into this one per call) cost ~5 %
    of a 512-token-chunked 2k prefill on one core."""
    key = (c, n, window, query.dtype, query.device)
    if getattr(_STATE, "mask_key", None) != key:
        q_pos = torch.arange(n - c, n, device=query.device)[:, None]
        k_pos = torch.arange(n, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if window > 0:
            allowed &= (q_pos - k_pos) < window
        _STATE.mask = torch.zeros((c, n), dtype=query.dtype, device=query.device).masked_fill_(~allowed,
                                                                                                float("-inf"))
        _STATE.mask_key = key
    return _STATE.mask


@prefill_attention.register_fake
def _(query, key, value, layer, scale, window):
    return fake_output(query)


register_attention(IMPL, torch.ops.semshare.prefill_attention, "compiled prefill")


@contextlib.contextmanager
def _routed(model: torch.nn.Module, cache):
    _STATE.cache, _STATE.touched = cache, False
    try:
        with attention_impl(model, IMPL):
            yield
    finally:
        _STATE.cache = None


class CompiledPrefill(CompiledPass):
    """The compiled full-prefill forward of one model; :meth:`forward` has
    :func:`semshare_core.prefill.full_prefill`'s contract."""

    what, eager = "compiled prefill", "prefilling"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, logger)
        self.compiled_chunks = 0

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(ids, pos)                                       # [1, c, hidden]
        return self.model.lm_head(self.base.norm(hidden[:, -1:]))[0, -1].float()   # [vocab]

    def forward(self, ids: torch.Tensor, cache=None):
        """``(logits float32 [vocab], DynamicCache)`` for the chunk ``ids`` (int64 ``[c]``) after
        the rows ``cache`` holds (None: the prompt's first chunk), as ``full_prefill``."""
        from .prefill import full_length_cache, full_prefill

        c = int(ids.numel())
        if c < 2 or self.failed is not None:
            return full_prefill(self.model, ids, cache)
        cache = full_length_cache() if cache is None else cache
        past = cache.get_seq_length()
        # a fresh tensor made here, under the caller's inference mode: ids that were a view of a
        # tensor made outside it would carry other dispatch keys, and cost a second graph
        ids2 = ids.reshape(1, -1).to(self.device).clone()
        pos = torch.arange(past, past + c, device=self.device)[None]
        _STATE.touched = False
        logits = self._run(ids2, pos, _routed(self.model, cache), lambda: _STATE.touched)
        if logits is None:  # could not compile: nothing was appended yet
            return full_prefill(self.model, ids, cache)
        self.compiled_chunks += 1
        return logits, cache
