"""Host staging for reference KV that lives in host memory (e.g. the Ray object store).

A hit on an accelerator gathers the reference rows it needs on the host and copies them
to the device. From pageable memory that copy is slow and synchronous (measured on an
H200: 512 MB in ~82 ms pageable vs ~10 ms pinned). :class:`HostStaging` gathers straight
into one reusable, page-locked buffer and starts an asynchronous copy from it; a CUDA
event keeps the next gather from overwriting the buffer before that copy is done.
"""
from __future__ import annotations

import math

import torch


class HostStaging:
    """A reusable host buffer: ``gather(src, dim, idx)`` -> ``src.index_select(dim, idx)`` on ``device``.

    ``pin`` (default: on CUDA devices) page-locks the buffer and makes the copy
    asynchronous. The buffer grows to the largest gather seen and is kept.
    """

    def __init__(self, device: torch.device, pin: bool | None = None):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.buffer: torch.Tensor | None = None
        self._copied = None  # CUDA event of the last copy out of the buffer

    def gather(self, src: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        """``src`` (host) rows ``idx`` along ``dim``, as new memory on ``device``."""
        shape = list(src.shape)
        shape[dim] = int(idx.numel())
        need = math.prod(shape)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy still reads the buffer
            self._copied = None
        if self.buffer is None or self.buffer.dtype != src.dtype or self.buffer.numel() < need:
            self.buffer = None
            self.buffer = torch.empty(need, dtype=src.dtype, pin_memory=self.pin)
        staged = self.buffer[:need].view(shape)
        torch.index_select(src, dim, idx, out=staged)
        if self.device.type == "cpu":
            return staged.clone()  # the caller owns (and modifies) the result
        out = staged.to(self.device, non_blocking=self.pin)
        if self.pin and self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out
