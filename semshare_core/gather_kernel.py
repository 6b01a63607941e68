"""A native one-pass gather + key re-rotation for a hit's reused KV on a CPU (bf16).

A hit copies each reused row of its cached prompt(s) into prompt order and rotates every
reused key by its own offset (prompt position - source position). In torch that is a
copy per run of rows, then, per layer, a float32 copy of the keys, four float32 passes
(the half-split rotation) and a copy back to bf16: ~30 ms for the keys of a 2.3k-token
prompt of SmolLM2-135M on one core, plus the copies. ``csrc/gather_rotate.c`` reads each
source row once and writes each output row once, rotating keys on the fly, with the
same float32 arithmetic and the same rounding to bf16 (the same bits).

Built with :mod:`semshare_core.native` at first use (portable C, ``-O3``, ``-march=native``
on x86_64). Where it cannot be (no compiler, a failed build) :func:`load` returns None
with the reason logged and the engine uses the torch path. It is used only for bf16 KV
on a CPU with a half-split rotary embedding (:class:`semshare_core.rope.Rerotator`'s
``fast``); everything else keeps the torch path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import native

logger = logging.getLogger(__name__)

SOURCE = native.CSRC / "gather_rotate.c"
ABI = 1
MAX_HEAD_DIM = 512


def flags() -> list[str]:
    arch = ["-march=native"] if native.is_x86_64() else []
    return ["-O3", *arch, "-ffp-contract=off", "-shared", "-fPIC"]


class GatherKernel:
    """The loaded library: :meth:`gather_rotate` fills a hit's reused KV buffer."""

    def __init__(self, path: Path):
        # PyDLL keeps the GIL: one call per hit, tens of milliseconds at most
        lib = ctypes.PyDLL(str(path))
        if lib.semshare_gather_rotate_abi() != ABI:
            raise RuntimeError(f"{path} has another calling convention")
        fn = lib.semshare_gather_rotate
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + \
            [ctypes.c_int64, ctypes.c_int]
        self._fn = fn
        self.path = path

    @staticmethod
    def handles(out: torch.Tensor, sources: Sequence[torch.Tensor]) -> bool:
        """Whether the kernel takes these tensors: bf16 on the CPU, contiguous, one layout."""
        if out.dtype != torch.bfloat16 or out.device.type != "cpu" or out.dim() != 5 or not out.is_contiguous():
            return False
        L, two, H, _, D = out.shape
        if two != 2 or D % 2 or D > MAX_HEAD_DIM:
            return False
        return all(s.dtype == torch.bfloat16 and s.device.type == "cpu" and s.is_contiguous() and s.dim() == 5
                   and (s.shape[0], s.shape[1], s.shape[2], s.shape[4]) == (L, 2, H, D) for s in sources)

    def gather_rotate(self, out: torch.Tensor, sources: Sequence[torch.Tensor], row_src: np.ndarray,
                      row_pos: np.ndarray, cos: torch.Tensor, sin: torch.Tensor, from_layer: int = 0) -> bool:
        """Fill ``out`` ``[L, 2, H, n, D]`` (bf16, contiguous) for layers ``[from_layer, L)``:
        row ``i`` is row ``row_pos[i]`` of ``sources[row_src[i]]`` (``[L, 2, H, m_k, D]``), its key
        rotated by ``cos``/``sin`` ``[n, D]`` (float32, halves duplicated, as
        :meth:`semshare_core.rope.Rerotator.angles` gives); ``row_src[i] < 0``: zeros.
        Returns False (nothing written) where the kernel does not take the tensors."""
        n = int(out.shape[3])
        if not self.handles(out, sources) or row_src.shape != (n,) or row_pos.shape != (n,):
            return False
        if tuple(cos.shape) != (n, out.shape[4]) or tuple(sin.shape) != (n, out.shape[4]):
            return False
        h = int(out.shape[4]) // 2
        c = cos[:, :h].to(device="cpu", dtype=torch.float32).contiguous()
        s = sin[:, :h].to(device="cpu", dtype=torch.float32).contiguous()
        src_idx = np.ascontiguousarray(row_src, dtype=np.int32)
        pos = np.ascontiguousarray(row_pos, dtype=np.int64)
        ptrs = (ctypes.c_void_p * max(1, len(sources)))(*[t.data_ptr() for t in sources])
        lens = np.array([t.shape[3] for t in sources] or [0], dtype=np.int64)
        L, _, H, _, D = out.shape
        rc = self._fn(out.data_ptr(), ptrs, lens.ctypes.data, len(sources), src_idx.ctypes.data, pos.ctypes.data,
                      c.data_ptr(), s.data_ptr(), int(L), int(from_layer), int(H), n, int(D))
        if rc != 0:
            raise ValueError(f"gather kernel refused its arguments (code {rc}): row positions out of range?")
        return True


@functools.lru_cache(maxsize=None)
def load() -> Optional[GatherKernel]:
    """The kernel, built if needed; None (reason logged once) where it cannot be."""
    cc = native.compiler()
    if cc is None:
        logger.info("native KV gather unavailable: no C compiler found (set CC, or install gcc); using torch")
        return None
    try:
        return GatherKernel(native.build_library(cc, SOURCE, flags(), "gather_rotate"))
    except Exception as e:  # noqa: BLE001 - an optimisation: the torch path always works
        logger.warning("native KV gather failed to build or load (%s: %s); using torch", type(e).__name__, e)
        return None
