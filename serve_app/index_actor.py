"""`IndexActor`: the one shared semantic index, and the owner of every cached KV object.

A named, detached Ray actor wrapping :class:`semshare_core.SemanticIndex`. Replicas
hand it the prompt's :class:`~semshare_core.PackedKV` in ``register``; the actor
``ray.put``s it itself, so the object's owner is the actor, not the replica (an object
put by a replica dies with that replica: ``OwnerDiedError``). Entry payloads are the
``ObjectRef``s; eviction / removal drops the ref and the object store frees the bytes
once no borrower holds it.

``lookup`` returns a :class:`LookupResult` whose ``refs`` is a one-element list:
nested refs are passed as references (the caller becomes a borrower) instead of being
dereferenced by Ray on return.

The actor restarts forever (``max_restarts=-1``) but comes back EMPTY: its objects
died with it. Callers must treat an unreachable actor or a lost object as a miss.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import ray

from semshare_core import PackedKV, SemanticIndex

logger = logging.getLogger(__name__)


@dataclass
class LookupResult:
    """A hit: the entry's key, cosine similarity, its prompt length and ``[kv_ref]``."""

    key: str
    similarity: float
    ref_token_count: int
    refs: list = field(default_factory=list)  # [ObjectRef(PackedKV)], nested on purpose


class KVIndex:
    """Plain class (testable without Ray except for ``ray.put``): index + counters."""

    def __init__(self, dim: int, max_items: int = 1024, max_bytes: int = 1 << 31,
                 tenant_max_items: Optional[int] = None, tenant_max_bytes: Optional[int] = None):
        self.index = SemanticIndex(dim, max_items=max_items, max_bytes=max_bytes,
                                   tenant_max_items=tenant_max_items, tenant_max_bytes=tenant_max_bytes)
        self.started = time.time()
        self.counters = {"lost_objects": 0, "corrupt_objects": 0, "mismatched_objects": 0, "registered": 0,
                         "rejected": 0, "injected_faults": 0}
        self.tenant_counters: dict[str, dict[str, int]] = {}

    def _tc(self, tenant: str) -> dict[str, int]:
        return self.tenant_counters.setdefault(tenant, {"hits": 0, "misses": 0})

    # writes ----------------------------------------------------------------------
    def register(self, key: str, vector: np.ndarray, token_ids: np.ndarray, packed: PackedKV,
                 tenant: str = "default") -> dict:
        """Store ``packed`` (this actor becomes the object's owner). Returns what happened."""
        if not isinstance(packed, PackedKV):
            raise TypeError(f"register expects a PackedKV, got {type(packed).__name__}")
        nbytes = packed.nbytes
        if nbytes > self.index.max_bytes or (self.index.tenant_max_bytes is not None
                                             and nbytes > self.index.tenant_max_bytes):
            self.counters["rejected"] += 1
            return {"key": key, "stored": False, "reason": "larger than the byte cap", "nbytes": nbytes,
                    "evicted": []}
        ref = ray.put(packed)
        del packed
        evicted = self.index.add(key, vector, token_ids, nbytes, ref, tenant=tenant)
        self.counters["registered"] += 1
        return {"key": key, "stored": True, "nbytes": nbytes, "evicted": [e.key for e in evicted],
                "index_bytes": self.index.nbytes}

    def report_lost(self, key: str) -> bool:
        """A caller could not fetch ``key``'s object: drop the entry and count it."""
        self.counters["lost_objects"] += 1
        return self.index.remove(key) is not None

    def report_bad(self, key: str, reason: str = "corrupt") -> bool:
        """A caller rejected ``key``'s object (``corrupt``: malformed / truncated; ``mismatch``:
        another model's KV): drop the entry and count it."""
        self.counters["mismatched_objects" if reason == "mismatch" else "corrupt_objects"] += 1
        return self.index.remove(key) is not None

    def remove(self, key: str) -> bool:
        return self.index.remove(key) is not None

    def inject_fault(self, key: str, kind: str) -> bool:
        """Fault injection for tests and chaos drills: damage ``key``'s stored object in place.

        ``lose``: the entry now points at an object whose owner has died (``OwnerDiedError``
        on get); ``truncate``: a PackedKV whose array lost half its tokens (unpickling skips
        validation); ``corrupt_bytes`` / ``truncate_bytes``: the CRC-checked wire format
        with one flipped byte / cut in half; ``foreign``: the signature of another model.
        The entry keeps its metadata, so the next lookup still finds it.
        """
        e = self.index.get(key)
        if e is None:
            return False
        if kind == "lose":
            helper = _Holder.options(num_cpus=0).remote()
            refs = ray.get(helper.hold.remote(e.nbytes))
            ray.kill(helper, no_restart=True)
            deadline = time.time() + 30
            while time.time() < deadline:  # ray.kill is asynchronous: wait until the owner is gone
                try:
                    ray.get(helper.hold.remote(1), timeout=5)
                except Exception:  # noqa: BLE001 - RayActorError once it is dead
                    break
                time.sleep(0.1)
            e.payload = refs[0]
        else:
            packed: PackedKV = ray.get(e.payload)
            if kind == "truncate":
                bad = object.__new__(PackedKV)
                half = max(1, packed.seq_len // 2)
                for name, value in (("data", np.ascontiguousarray(packed.data[:, :, :, :half])),
                                    ("dtype", packed.dtype), ("token_ids", packed.token_ids.copy()),
                                    ("signature", packed.signature)):
                    object.__setattr__(bad, name, value)
                e.payload = ray.put(bad)
            elif kind in ("corrupt_bytes", "truncate_bytes"):
                blob = bytearray(packed.to_bytes())
                if kind == "corrupt_bytes":
                    blob[len(blob) // 2] ^= 0xFF
                else:
                    blob = blob[: len(blob) // 2]
                e.payload = ray.put(bytes(blob))
            elif kind == "foreign":
                from dataclasses import replace

                e.payload = ray.put(PackedKV(packed.data, packed.dtype, packed.token_ids,
                                             replace(packed.signature, weights="0" * 16)))
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
        self.counters["injected_faults"] += 1
        return True

    def clear(self, tenant: Optional[str] = None) -> int:
        return len(self.index.clear(tenant))

    # reads -----------------------------------------------------------------------
    def lookup(self, vector: np.ndarray, tenant: str = "default", threshold: float = 0.3) -> Optional[LookupResult]:
        """Best entry of ``tenant`` only, if its similarity >= ``threshold``."""
        m = self.index.lookup(vector, tenant=tenant, threshold=threshold)
        if m is None:
            self._tc(tenant)["misses"] += 1
            return None
        self._tc(tenant)["hits"] += 1
        e = m.entry
        return LookupResult(e.key, float(m.similarity), int(e.token_ids.shape[0]), [e.payload])

    def stats(self, tenant: Optional[str] = None) -> dict:
        s = self.index.stats()
        out = {"entries": s["entries"], "bytes": s["bytes"], "max_items": s["max_items"],
               "max_bytes": s["max_bytes"], "hits": s["hits"], "misses": s["misses"],
               "evictions": s["evictions"], "inserts": s["inserts"], **self.counters,
               "uptime_s": round(time.time() - self.started, 3)}
        tenants = {t: dict(v) for t, v in s["tenants"].items()}
        for t, c in self.tenant_counters.items():
            tenants.setdefault(t, {"entries": 0, "bytes": 0}).update(c)
        if tenant is not None:
            out["tenant"] = tenant
            out["tenant_stats"] = tenants.get(tenant, {"entries": 0, "bytes": 0, "hits": 0, "misses": 0})
        else:
            out["tenants"] = tenants
        return out

    def entries(self) -> list[dict]:
        """Entry metadata (no payloads), LRU order: oldest first."""
        return [{"key": e.key, "tenant": e.tenant, "nbytes": e.nbytes, "tokens": int(e.token_ids.shape[0]),
                 "hits": e.hits, "created": e.created} for e in self.index.entries()]

    def audit(self) -> dict:
        """Check the byte accounting against the stored objects themselves (slow; tests/ops)."""
        recorded, actual, lost = 0, 0, []
        for e in list(self.index.entries()):
            recorded += e.nbytes
            try:
                obj = ray.get(e.payload, timeout=30)
                actual += len(obj) if isinstance(obj, (bytes, bytearray)) else obj.nbytes
            except Exception:  # noqa: BLE001 - report, never raise
                lost.append(e.key)
        return {"index_bytes": self.index.nbytes, "sum_entry_nbytes": recorded, "sum_object_nbytes": actual,
                "entries": len(self.index), "lost": lost}

    def ping(self) -> dict:
        return {"ok": True, "entries": len(self.index), "uptime_s": round(time.time() - self.started, 3)}


@ray.remote(num_cpus=0)
class _Holder:
    """Owns an object, then is killed: leaves a ref whose owner is dead (``inject_fault``)."""

    def hold(self, nbytes: int) -> list:
        return [ray.put(np.zeros(max(1, min(int(nbytes), 1 << 20)), dtype=np.uint8))]


# The actor: restarts forever (comes back empty); a call made while it restarts is
# retried a few times rather than failing at once. num_cpus=0: it is light and must
# never wait for a CPU slot held by a model replica.
IndexActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3, max_concurrency=1)(KVIndex)


def get_or_create_index_actor(name: str, namespace: str, dim: int, max_items: int, max_bytes: int,
                              tenant_max_items: Optional[int] = None, tenant_max_bytes: Optional[int] = None,
                              detached: bool = True) -> Any:
    """The named index actor, created on first use (``get_if_exists`` makes it race-free).

    Detached, so it outlives the replica that created it (a non-detached actor would
    fate-share with its creator) and survives app redeploys. The first creator's caps win.
    """
    opts = dict(name=name, namespace=namespace, get_if_exists=True)
    if detached:
        opts["lifetime"] = "detached"
    return IndexActor.options(**opts).remote(dim, max_items, max_bytes, tenant_max_items, tenant_max_bytes)
