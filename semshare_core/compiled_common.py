"""What the compiled passes (:mod:`semshare_core.compiled_decode`,
:mod:`semshare_core.compiled_prefill`) share: when to compile, the cache object the traced
layers see, and the attention function that hands each layer to an opaque custom op."""
from __future__ import annotations

import logging
import shutil
from typing import Callable, Optional

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

MODES = ("auto", "on", "off")


def compiler_available() -> bool:
    """Inductor's CPU backend builds C++: a compiler must be on PATH."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def wanted(mode: str, device: torch.device, dtype: torch.dtype, knob: str = "compile_decode") -> bool:
    """Whether ``mode`` (:data:`MODES`) asks for a compiled pass on this device and dtype:
    ``auto`` = bf16 on a CPU with a C++ compiler."""
    if mode not in MODES:
        raise ValueError(f"{knob} must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False
    if mode == "on":
        return True
    return device.type == "cpu" and dtype == torch.bfloat16 and compiler_available()


class TracedCache:
    """The cache object the traced layers see: the rows are appended inside the custom op."""

    is_compileable = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


TRACED = TracedCache()


def fake_output(query: torch.Tensor) -> torch.Tensor:
    """The custom ops' output for ``query [1, Hq, n, D]``: ``[1, n, Hq, D]``."""
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def failure_text(e: BaseException) -> str:
    """What a failed compile is remembered and logged as: type and first line, at most 300 characters."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def register_attention(impl: str, op: Callable, what: str) -> None:
    """Register ``impl`` in transformers' ``AttentionInterface``: each layer's attention calls
    ``op(query, key, value, layer_idx, scale, window)`` (window 0 = none)."""

    def attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError(f"{what}: attention softcap / sinks are not supported")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        return op(query, key, value, module.layer_idx, scale, int(sliding_window or 0)), None

    ALL_ATTENTION_FUNCTIONS.register(impl, attention)


class CompiledPass:
    """A forward pass of ``model`` compiled once (:meth:`_forward`, traced with the stock
    layers and :data:`TRACED` as their cache), with the fallback both passes share: a
    failure while tracing or compiling, before any cache changed, is kept in :attr:`failed`
    and logged once, and the pass runs eagerly from then on."""

    what = "compiled pass"  # for the log line: "<what> unavailable (...); <eager> eagerly"
    eager = "running"

    def __init__(self, model: torch.nn.Module, log: logging.Logger):
        from .prefill import _base, cache_kwarg, decoder_layers

        self.model = model
        self.base = _base(model)
        self.device = self.base.embed_tokens.weight.device
        self.ckw = cache_kwarg(decoder_layers(model)[0].forward)
        self.failed: Optional[str] = None
        self.log = log
        self._fn = torch.compile(self._forward, fullgraph=True, dynamic=None)

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The traced layers: hidden states ``[1, n, hidden]`` of ``ids [1, n]`` at ``pos [1, n]``."""
        from .prefill import run_layers

        return run_layers(self.model, ids, pos, TRACED, self.ckw)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def active(self) -> bool:
        return self.failed is None

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, routed, touched: Callable[[], bool]):
        """The compiled forward of ``ids`` / ``pos`` (both marked dynamic in dim 1) inside the
        ``routed`` context; None when it could not compile (the caller runs eagerly). A failure
        once ``touched()`` (a cache changed) is raised, as an eager one would be."""
        torch._dynamo.mark_dynamic(ids, 1)
        torch._dynamo.mark_dynamic(pos, 1)
        try:
            # freezing (weights as constants: oneDNN-packed bf16 linears) is read when a graph
            # compiles; torch.compile(options=...) does not reach it, a config patch does
            with torch.no_grad(), torch._inductor.config.patch(freezing=True), routed:
                return self._fn(ids, pos)
        except Exception as e:
            if touched():
                raise
            self.failed = failure_text(e)
            self.log.warning("%s unavailable (%s); %s eagerly", self.what, self.failed, self.eager)
            return None
