"""Host staging for reference KV that lives in host memory (e.g. the Ray object store).

A hit on an accelerator gathers the reference rows it needs on the host and copies them
to the device. From pageable memory that copy is slow and synchronous (measured on an
H200: 512 MB in ~82 ms pageable vs ~10 ms pinned). Two ways, chosen by
``SemShareConfig.host_staging``:

* ``whole`` -- :class:`HostStaging` gathers all layers straight into one reusable,
  page-locked buffer and starts one asynchronous copy from it, before the layer loop; a
  CUDA event keeps the next gather from overwriting the buffer before that copy is done.
* ``layered`` (the default on CUDA) -- :class:`LayerFeed` owns the prompt's KV buffer on
  the device and fills it one layer at a time: the host gathers layer ``l`` into one of
  two reusable pinned slots (:class:`PinnedSlots`, kept by the engine across hits; a
  slot's previous copy is waited for before it is overwritten) and the copy runs on a
  side stream. :func:`semshare_core.prefill.selective_prefill` stages layer ``l + 2``
  right after launching layer ``l``'s kernels, so the host gather overlaps the device's
  compute, and makes the compute stream wait for a layer's copy (no host block) before
  re-rotating and reading it. Non-CUDA devices (and unpinned slots) copy synchronously.

Both give the same KV (tested on the CPU, where ``layered`` can be forced and runs the
same code with synchronous copies). Neither is measured on a GPU yet: whether the
overlap pays, and what ``whole`` costs next to it, is what ``benchmarks/gpu_run.sh``
run 2 (``benchmarks/sweeps/gpu-staging.yaml``) is for.
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


class ImmediateFeed:
    """A reference already gathered and re-rotated (``buffer`` ``[L, 2, H, n, D]``): no-op hooks.

    What :func:`semshare_core.prefill.selective_prefill` wraps a plain tensor in.
    """

    def __init__(self, buffer: torch.Tensor, staging: str = "cpu"):
        self.buffer = buffer
        self.staging = staging

    def stage(self, layer: int) -> None:
        pass

    def ready(self, layer: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class PinnedSlots:
    """A small ring of reusable host slots for :class:`LayerFeed` (owned by the engine, kept across hits).

    ``take(i, shape, dtype)`` returns slot ``i`` viewed as ``shape`` after the copy last
    issued out of it has finished (its CUDA event); a slot grows to the largest layer
    seen and is kept. ``pin`` (default: on CUDA devices) page-locks the slots.
    """

    def __init__(self, device: torch.device, count: int = 2, pin: bool | None = None):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.slots: list[torch.Tensor | None] = [None] * count
        self.events: list = [None] * count  # CUDA event of the last copy out of each slot
        self._stream = None

    def copy_stream(self):
        """The side stream the layer copies run on (CUDA), created once and kept."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def __len__(self) -> int:
        return len(self.slots)

    def take(self, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.events[i] is not None:
            self.events[i].synchronize()  # a copy issued earlier still reads this slot
            self.events[i] = None
        need = math.prod(shape)
        slot = self.slots[i]
        if slot is None or slot.dtype != dtype or slot.numel() < need:
            self.slots[i] = None
            slot = self.slots[i] = torch.empty(need, dtype=dtype, pin_memory=self.pin)
        return slot[:need].view(shape)

    def copied(self, i: int, event) -> None:
        self.events[i] = event


class LayerFeed:
    """The prompt's KV buffer ``[L, 2, H, n, D]`` on ``device``, filled from host KV one layer at a time.

    ``src``: host reference KV ``[L, 2, H, m, D]``; ``idx``: int64 ``[n]`` reference row of
    each target token; ``angles``: float32 ``(cos, sin)`` ``[n, head_dim]`` of the key
    re-rotation (:meth:`semshare_core.rope.Rerotator.angles`), computed once;
    ``rotate``: ``rotate(keys, cos, sin)`` rotating ``[H, n, D]`` keys in place.

    * ``stage(l)``: gathers layer ``l``'s rows on the host into a slot of ``slots`` and
      copies the slot into ``buffer[l]``. On CUDA with pinned slots the copy is issued
      on a side stream (which first waits on the current stream, so the buffer's
      allocation is ordered before it) and is asynchronous: the host can gather the next
      layer while the device computes. Elsewhere the copy is synchronous.
    * ``ready(l)``: the current stream waits for layer ``l``'s copy (no host block), then
      layer ``l``'s keys are re-rotated in place on the current stream.
    * ``finish()``: the current stream waits for every copy issued, so that nothing frees
      or reuses memory under a pending copy (call it in a ``finally``; also ``with feed:``).

    ``stage``/``ready`` are idempotent and ignore layers out of range.
    """

    staging = "layered"

    def __init__(self, src: torch.Tensor, idx: torch.Tensor, slots: PinnedSlots, device: torch.device,
                 dtype: torch.dtype, angles: tuple[torch.Tensor, torch.Tensor], rotate):
        self.src = src
        self.idx = idx.to("cpu", torch.int64)
        self.slots = slots
        self.device = torch.device(device)
        L, two, H, _, D = src.shape
        self.num_layers = L
        self.layer_shape = (two, H, int(self.idx.numel()), D)
        self.cos, self.sin = angles
        self.rotate = rotate
        self.asynchronous = self.device.type == "cuda" and slots.pin
        self.buffer = torch.empty((L, *self.layer_shape), dtype=dtype, device=self.device)
        self.events: list = [None] * L
        self.staged = [False] * L
        self.rotated = [False] * L
        self.stream = None
        if self.asynchronous:
            self.stream = slots.copy_stream()
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def stage(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers or self.staged[layer]:
            return
        self.staged[layer] = True
        i = layer % len(self.slots)
        slot = self.slots.take(i, self.layer_shape, self.buffer.dtype)
        if self.src.dtype == self.buffer.dtype:
            torch.index_select(self.src[layer], 2, self.idx, out=slot)
        else:  # convert on the host (as ``.to(dtype)`` would): same-dtype copy, fewer bytes when narrowing
            slot.copy_(self.src[layer].index_select(2, self.idx))
        if not self.asynchronous:
            self.buffer[layer].copy_(slot)
            return
        with torch.cuda.stream(self.stream):
            self.buffer[layer].copy_(slot, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[layer] = event
        self.slots.copied(i, event)

    def ready(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers or self.rotated[layer]:
            return
        self.stage(layer)
        if self.events[layer] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.events[layer])
        self.rotate(self.buffer[layer, 0], self.cos, self.sin)
        self.rotated[layer] = True

    def finish(self) -> None:
        if self.asynchronous:
            current = torch.cuda.current_stream(self.device)
            for event in self.events:
                if event is not None:
                    current.wait_event(event)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
