"""Replica-local hot tier: reference KV held ready for the engine.

An LRU, bounded by bytes, of index entries this replica registered or fetched. Each
holds the checked :class:`~semshare_core.PackedKV` (token ids, signature, first-token
logits) and its KV as a tensor on the engine's device, ``[L, 2, H, n, D]``, passed to
``engine.prefill(..., reference_kv=)``. A hot hit skips the object-store get, the
validation and the conversion.

On the CPU the tensor is a view of the packed array (no second copy); on an
accelerator it is a device copy (the host array is kept too: the engine reads token
ids, logits and shapes from it, and it is what a replica would re-register).

The host arrays are always this process's own memory, never views into the object
store (:func:`private_copy`): a hot copy never keeps an index entry's object alive after
the index dropped it, so the object store holds at most ``index_max_bytes`` of entries
(plus what requests in flight still read).

Keys are entry *versions* (``uid``), not index keys: an entry overwritten under the
same key, or damaged at rest, gets a new uid, so a stale hot copy is never used.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from semshare_core import PackedKV


@dataclass
class HotEntry:
    uid: str
    key: str          # index key (tenant:key), to report evictions
    packed: PackedKV
    kv: torch.Tensor  # on the engine device
    nbytes: int
    depth: int
    exact: bool
    hits: int = 0


def default_hot_bytes(device: torch.device | str, num_gpus: float = 0.0, weights_bytes: int = 0,
                      kv_budget_bytes: int = 0) -> int:
    """The hot tier's default cap for one replica.

    On an accelerator: what is left of this replica's share of the card (``num_gpus``
    below 1 is a fraction of it) after its weights and its scheduler's KV budget, half of
    it, and at most 20% of the share (fractional GPUs never overcommit). On the CPU 5% of
    RAM, at most 1 GiB.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return hot_bytes_for(total, num_gpus, weights_bytes, kv_budget_bytes)
    try:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(min(1 << 30, ram * 0.05))


def hot_bytes_for(total: int, num_gpus: float, weights_bytes: int, kv_budget_bytes: int) -> int:
    """The accelerator rule of :func:`default_hot_bytes` on plain numbers."""
    share = total * min(1.0, num_gpus or 1.0)
    left = share - weights_bytes - kv_budget_bytes
    return int(max(0.0, min(0.2 * share, 0.5 * left)))


def device_kv(packed: PackedKV, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``packed``'s KV on ``device`` (a view on the CPU when the dtype matches)."""
    return packed.to_torch(device, dtype)


def private_copy(packed: PackedKV) -> PackedKV:
    """``packed`` with its arrays (``data`` ``[L, 2, H, n, D]``, ``token_ids`` ``[n]``,
    ``last_logits`` ``[vocab]``) copied into this process's own memory.

    A PackedKV from ``ray.get`` holds zero-copy, read-only views into the object store;
    while any of them lives, the whole object stays pinned there, whatever the index did
    with its entry. Whatever outlives a request (the hot tier) keeps this copy instead."""
    logits = None if packed.last_logits is None else np.array(packed.last_logits, copy=True)
    return PackedKV(np.array(packed.data, copy=True), packed.dtype, np.array(packed.token_ids, copy=True),
                    packed.signature, logits, bool(getattr(packed, "exact", True)))


def entry_bytes(packed: PackedKV, kv: torch.Tensor) -> int:
    """Bytes a hot entry holds: the host arrays, plus ``kv`` unless it is a view of them
    (on the CPU when the engine's dtype is the packed one)."""
    shared = kv.device.type == "cpu" and kv.data_ptr() == packed.data.ctypes.data
    return int(packed.nbytes + (0 if shared else kv.numel() * kv.element_size()))


class HotTier:
    """Thread-safe LRU by bytes. ``on_evict(entries)`` is called outside the lock."""

    def __init__(self, max_bytes: int, on_evict: Optional[Callable[[list[HotEntry]], None]] = None):
        self.max_bytes = int(max_bytes)
        self.on_evict = on_evict
        self._entries: OrderedDict[str, HotEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.counters = {"hits": 0, "misses": 0, "inserts": 0, "evictions": 0, "rejected": 0, "dropped": 0}

    def get(self, uid: str) -> Optional[HotEntry]:
        with self._lock:
            e = self._entries.get(uid)
            if e is None:
                self.counters["misses"] += 1
                return None
            self._entries.move_to_end(uid)
            e.hits += 1
            self.counters["hits"] += 1
            return e

    def __contains__(self, uid: str) -> bool:
        with self._lock:
            return uid in self._entries

    def put(self, entry: HotEntry) -> bool:
        """Insert (or refresh) ``entry``; False when it alone exceeds the cap."""
        if entry.nbytes > self.max_bytes:
            self.counters["rejected"] += 1
            return False
        evicted = []
        with self._lock:
            old = self._entries.pop(entry.uid, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                _, e = self._entries.popitem(last=False)
                self._bytes -= e.nbytes
                evicted.append(e)
            self._entries[entry.uid] = entry
            self._bytes += entry.nbytes
            self.counters["inserts"] += 1
            self.counters["evictions"] += len(evicted)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return True

    def drop(self, uid: str) -> Optional[HotEntry]:
        with self._lock:
            e = self._entries.pop(uid, None)
            if e is not None:
                self._bytes -= e.nbytes
                self.counters["dropped"] += 1
            return e

    def drop_key(self, key: str, keep: Optional[str] = None) -> list[HotEntry]:
        """Drop every version of index key ``key`` (a bad entry), but ``keep`` (a uid: the
        current version, when the others are stale)."""
        with self._lock:
            uids = [u for u, e in self._entries.items() if e.key == key and u != keep]
        return [e for e in (self.drop(u) for u in uids) if e is not None]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    **self.counters}
