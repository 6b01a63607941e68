"""A native decode-attention kernel for bf16 on x86 CPUs (AVX512-BF16), built at first use.

A decode step attends every running request's one new query over that request's own KV
rows (:mod:`semshare_core.batch`). With the stock SDPA that is one call per request and
layer, and PyTorch's CPU kernel reads bf16 K/V at ~4-5 GB/s on one core, about as long as
the step's linear layers at 8 requests of 1k tokens. ``csrc/decode_attn.c`` does a whole
layer's requests in one call: per request and KV head, the group's query heads are scored
against each K row with VDPBF16PS (bf16 pairs, fp32 accumulation), the softmax is fp32,
and the values' weighted sum is fp32 rounded to bf16 once; each K and V row is read once.

It is compiled with ``-O3 -march=native`` by :mod:`semshare_core.native` (the system C
compiler, into the cache, keyed by the source, the compiler and the CPU), so a replica
builds it once (~4 s) and later starts load it. Where anything is missing (another architecture, no AVX512-BF16, no
compiler, a failed build) :func:`load` returns None with the reason logged, and decode
uses SDPA.

Results are not bitwise SDPA's: the rounding differs (outputs within bf16 rounding of
SDPA's, ~60 % of elements bit-identical). Float32 models never use it, so the invariants
pinned on float32 (reuse off = ``model.generate``) are untouched; ``decode_attention:
"sdpa"`` keeps bf16 decode bit-identical to ``generate`` too.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import platform
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import native

logger = logging.getLogger(__name__)

SOURCE = native.CSRC / "decode_attn.c"
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
ABI = 2
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per KV head
MODES = ("auto", "native", "sdpa")
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def cpu_flags() -> set[str]:
    return native.cpu_flags()


def _compiler() -> Optional[str]:
    return native.compiler()


def unavailable_reason() -> Optional[str]:
    """Why this machine cannot build the kernel, or None."""
    if not native.is_x86_64():
        return f"not an x86_64 CPU ({platform.machine()})"
    missing = [f for f in _REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler found (set CC, or install gcc)"
    return None


def build(cc: str) -> Path:
    """Compile the kernel (unless already cached); returns the library's path."""
    return native.build_library(cc, SOURCE, FLAGS, "decode_attn")


class DecodeKernel:
    """The loaded library: :meth:`attend` does one layer of a batched decode step."""

    def __init__(self, path: Path):
        # PyDLL: the call keeps the GIL. A layer's call takes well under a millisecond; letting
        # the replica's other Python threads (event loop, exports) take the GIL 30 times a
        # step would make the engine thread wait up to a switch interval (5 ms) each time.
        lib = ctypes.PyDLL(str(path))
        if lib.semshare_decode_attn_abi() != ABI:
            raise RuntimeError(f"{path} has another calling convention")
        fn = lib.semshare_decode_attn
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 3
        self._fn = fn
        self.path = path

    @staticmethod
    def handles(query: torch.Tensor, key: torch.Tensor) -> bool:
        """Whether a layer's shapes and dtypes are the kernel's (else the caller uses SDPA)."""
        return DecodeKernel.handles_shape(query.dtype, key.dtype, query.device, query.shape[-1],
                                          query.shape[1], key.shape[1])

    @staticmethod
    def handles_shape(q_dtype: torch.dtype, kv_dtype: torch.dtype, device: torch.device, head_dim: int,
                      q_heads: int, kv_heads: int) -> bool:
        return (q_dtype == torch.bfloat16 and kv_dtype == torch.bfloat16 and torch.device(device).type == "cpu"
                and head_dim in HEAD_DIMS and kv_heads > 0 and q_heads % kv_heads == 0
                and q_heads // kv_heads <= MAX_GROUP)

    def attend(self, query: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
               starts: Sequence[int], lengths: Sequence[int], scale: float,
               new_keys: Optional[torch.Tensor] = None, new_values: Optional[torch.Tensor] = None
               ) -> Optional[torch.Tensor]:
        """``query [1, Hq, B, D]``; request ``i`` attends rows ``[starts[i], lengths[i])`` of
        ``keys[i]`` / ``values[i]`` (contiguous ``[1, Hkv, capacity_i, D]`` buffers, the same
        capacity for both). ``new_keys`` / ``new_values`` ``[1, Hkv, B, D]`` (any strides with
        a unit last one): the step's rows, written to row ``lengths[i] - 1`` first (the row
        reserved for them). Returns ``[1, B, Hq, D]``, or None if the kernel refused the
        shapes (then nothing was written)."""
        b, hq, d = query.shape[2], query.shape[1], query.shape[3]
        for k, v in zip(keys, values):
            if not (k.is_contiguous() and v.is_contiguous() and k.shape == v.shape):
                return None
        nk = nv = None
        strides = None
        if new_keys is not None:
            if new_keys.stride(-1) != 1 or new_values.stride(-1) != 1 or new_keys.dtype != keys[0].dtype:
                return None
            nk, nv = new_keys, new_values
            strides = np.array([nk.stride(2), nk.stride(1), nv.stride(2), nv.stride(1)], dtype=np.int64)
        q = query[0].transpose(0, 1).contiguous()                    # [B, Hq, D]
        out = torch.empty_like(q)
        meta = np.array([[k.data_ptr() for k in keys], [v.data_ptr() for v in values],
                         [k.shape[2] for k in keys], list(starts), list(lengths)], dtype=np.int64)
        p = meta.ctypes.data
        row = meta.strides[0]
        rc = self._fn(q.data_ptr(), out.data_ptr(), p, p + row, p + 2 * row, p + 3 * row, p + 4 * row,
                      b, hq, int(keys[0].shape[1]), d, float(scale),
                      nk.data_ptr() if nk is not None else None, nv.data_ptr() if nv is not None else None,
                      strides.ctypes.data if strides is not None else None)
        return out.unsqueeze(0) if rc == 0 else None


@functools.lru_cache(maxsize=None)
def load() -> Optional[DecodeKernel]:
    """The kernel, built if needed; None (reason logged once) where it cannot be."""
    why = unavailable_reason()
    if why is not None:
        logger.info("native decode attention unavailable: %s; decode uses SDPA", why)
        return None
    try:
        return DecodeKernel(build(_compiler()))
    except Exception as e:  # noqa: BLE001 - an optimisation: SDPA always works
        logger.warning("native decode attention failed to build or load (%s: %s); decode uses SDPA",
                       type(e).__name__, e)
        return None


def resolve(mode: str, device: torch.device, dtype: torch.dtype) -> Optional[DecodeKernel]:
    """The kernel a model on ``device`` / ``dtype`` decodes with under ``mode``:
    ``auto`` (the kernel for bf16 on a CPU where it builds, else SDPA), ``native`` (the
    same, but an error where it cannot be used), ``sdpa`` (None: the stock attention)."""
    if mode not in MODES:
        raise ValueError(f"decode_attention must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "sdpa":
        return None
    usable = torch.device(device).type == "cpu" and dtype == torch.bfloat16
    kernel = load() if usable else None
    if mode == "native" and kernel is None:
        why = unavailable_reason() if usable else f"it runs bf16 on a CPU, not {dtype} on {torch.device(device).type}"
        raise ValueError(f"decode_attention 'native' is not usable here: {why or 'the build failed (see the log)'}")
    return kernel
