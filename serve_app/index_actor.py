"""`IndexActor`: the one shared semantic index, holding a ref to every cached KV object.

A named, detached Ray actor wrapping :class:`semshare_core.SemanticIndex`. Where the
replica runs on another node than this actor (``kv_owner: auto``), its KV is put by the
:class:`~serve_app.kv_owner.KVOwner` of the replica's node and only its ref reaches the
index (``register_ref``: no copy here). Otherwise (and as the fallback) the replica hands
the :class:`~semshare_core.PackedKV` to ``register`` itself, and the actor
``ray.put``s it, so the object's owner is the actor, not the replica (an object put by a
replica dies with that replica: ``OwnerDiedError``). Entry payloads are the
``ObjectRef``s; eviction / removal drops the ref and the object store frees the bytes
once no borrower holds it.

``lookup`` returns a :class:`LookupResult` (:class:`serve_app.protocol.Reference`)
whose ``refs`` is a one-element list: nested refs are passed as references (the caller
becomes a borrower) instead of being dereferenced by Ray on return.

Each entry also carries metadata the serving path needs: a version ``uid`` (the key
of replicas' hot copies; a new one whenever the stored object changes), its
derivation ``depth`` (0: KV from a full prefill; n: reused an entry of depth n-1),
whether it is ``exact`` (a full prefill's KV, replayable), and the replicas that hold
a hot copy (``hot``; the request router prefers them). Lookups prefer an exact entry
over an approximate one whose similarity is within ``prefer_exact_margin``. Replicas that
die or leave the replica set are taken out of every ``hot`` by ``drop_holders``, which
the request router calls when its replica set shrinks (the entries stay: served cold).

The actor is asynchronous (:class:`AsyncKVIndex`): lookups run on its event loop while
registrations copy their KV into the object store in a worker thread.

The actor restarts forever (``max_restarts=-1``) but comes back EMPTY. A restart loses:
every entry and so its KV object (a KV owner frees it once no reader holds the ref; one
the actor put itself dies with it: refs handed out before the restart raise
``OwnerDiedError`` and count as ``lost_objects``, a full prefill), the hot-holder
lists (replicas' hot copies are keyed by entry ``uid``s the new actor never issued: they
age out of the hot tiers unused), the dead-replica list, and every counter and per-tenant
stat (``uptime_s`` restarts). Calls in flight are retried (``max_task_retries``) or time
out as misses. Callers must treat an unreachable actor or a lost object as a miss; the
cache refills as prompts are served again. Pin it to the head node
(:func:`index_actor_options`): if the head goes, the cluster goes with it anyway.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import ray

from semshare_core import PackedKV, SemanticIndex

from .protocol import Reference

logger = logging.getLogger(__name__)

# A hit: key, uid, cosine similarity, prompt length, depth, exact, hot replicas, [kv_ref].
LookupResult = Reference


@dataclass
class EntryMeta:
    uid: str
    depth: int = 0
    exact: bool = True
    hot: set = field(default_factory=set)


class KVIndex:
    """Plain class (testable without Ray except for ``ray.put``): index + counters."""

    MAX_DEAD = 4096  # replica ids remembered as gone (replica ids are never reused)
    # per-namespace hit/miss counters kept (least recently used forgotten first): a client
    # sending a new cache_salt per request would otherwise grow them without bound
    MAX_NAMESPACE_COUNTERS = 4096

    def __init__(self, dim: int, max_items: int = 1024, max_bytes: int = 1 << 31,
                 tenant_max_items: Optional[int] = None, tenant_max_bytes: Optional[int] = None):
        self.index = SemanticIndex(dim, max_items=max_items, max_bytes=max_bytes,
                                   tenant_max_items=tenant_max_items, tenant_max_bytes=tenant_max_bytes)
        self.started = time.time()
        self._node_id: Optional[str] = None  # where the actor runs (ping reports it)
        self.counters = {"lost_objects": 0, "corrupt_objects": 0, "mismatched_objects": 0, "reuse_errors": 0,
                         "registered": 0, "rejected": 0, "injected_faults": 0,
                         "dead_holders": 0, "dropped_hot": 0, "late_hot_refused": 0}
        self.tenant_counters: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.meta: dict[str, EntryMeta] = {}
        # replicas reported gone (insertion order, bounded): their late add_hot is refused
        self._dead: dict[str, None] = {}

    def _tc(self, tenant: str) -> dict[str, int]:
        c = self.tenant_counters.get(tenant)
        if c is None:
            c = self.tenant_counters[tenant] = {"hits": 0, "misses": 0}
            while len(self.tenant_counters) > self.MAX_NAMESPACE_COUNTERS:
                self.tenant_counters.popitem(last=False)
        else:
            self.tenant_counters.move_to_end(tenant)
        return c

    def _forget(self, entries) -> None:
        for e in entries:
            if e is not None:
                self.meta.pop(e.key, None)

    # writes ----------------------------------------------------------------------
    def register(self, key: str, vector: np.ndarray, token_ids: np.ndarray, packed: PackedKV,
                 tenant: str = "default", depth: int = 0, exact: Optional[bool] = None,
                 hot_replica: Optional[str] = None, uid: Optional[str] = None) -> dict:
        """Store ``packed`` (this actor becomes the object's owner). Returns what happened.

        ``depth``: derivation depth of the KV (0: full prefill); ``exact``: defaults to
        the packed KV's own flag (with first-token logits); ``hot_replica``:
        the registering replica keeps a hot copy under ``uid``.
        """
        refused = self.check_register(key, packed)
        if refused is not None:
            return refused
        exact = (packed.last_logits is not None and getattr(packed, "exact", True)) if exact is None else bool(exact)
        nbytes = packed.nbytes
        ref = ray.put(packed)
        del packed
        return self.commit_register(key, vector, token_ids, ref, nbytes, exact, tenant, depth, hot_replica, uid)

    def register_ref(self, key: str, vector: np.ndarray, token_ids: np.ndarray, refs: list, nbytes: int,
                     exact: bool, tenant: str = "default", depth: int = 0, hot_replica: Optional[str] = None,
                     uid: Optional[str] = None) -> dict:
        """Index an object that is already in the store, owned by the registering node's
        :class:`~serve_app.kv_owner.KVOwner` (``refs = [ref]``, ``nbytes`` its packed size):
        no copy here, so it is fast and runs beside lookups. The same caps as :meth:`register`."""
        if not (isinstance(refs, list) and len(refs) == 1 and isinstance(refs[0], ray.ObjectRef)):
            raise TypeError("register_ref expects [ObjectRef]")
        refused = self._refuse_size(key, int(nbytes))
        if refused is not None:
            return refused
        return self.commit_register(key, vector, token_ids, refs[0], int(nbytes), bool(exact), tenant, depth,
                                    hot_replica, uid)

    def check_register(self, key: str, packed: PackedKV) -> Optional[dict]:
        """The refusal :meth:`register` returns for ``packed`` (counted), or None if it may be stored."""
        if not isinstance(packed, PackedKV):
            raise TypeError(f"register expects a PackedKV, got {type(packed).__name__}")
        return self._refuse_size(key, packed.nbytes)

    def _refuse_size(self, key: str, nbytes: int) -> Optional[dict]:
        if nbytes > self.index.max_bytes or (self.index.tenant_max_bytes is not None
                                             and nbytes > self.index.tenant_max_bytes):
            self.counters["rejected"] += 1
            return {"key": key, "stored": False, "reason": "larger than the byte cap", "nbytes": nbytes,
                    "evicted": []}
        return None

    def commit_register(self, key: str, vector: np.ndarray, token_ids: np.ndarray, ref: Any, nbytes: int,
                        exact: bool, tenant: str = "default", depth: int = 0, hot_replica: Optional[str] = None,
                        uid: Optional[str] = None) -> dict:
        """The index half of :meth:`register`, once the object is in the store (``ref``, owned here): fast."""
        old = self.index.get(key)
        evicted = self.index.add(key, vector, token_ids, nbytes, ref, tenant=tenant)
        evicted_uids = [self.meta[e.key].uid for e in evicted if e.key in self.meta]
        self._forget(evicted)
        if old is not None:
            self.meta.pop(key, None)
        uid = uid or uuid.uuid4().hex
        hot = {hot_replica} if hot_replica and hot_replica not in self._dead else set()
        self.meta[key] = EntryMeta(uid, int(depth), exact, hot)
        self.counters["registered"] += 1
        return {"key": key, "stored": True, "nbytes": nbytes, "evicted": [e.key for e in evicted],
                "evicted_uids": evicted_uids, "index_bytes": self.index.nbytes, "uid": uid, "depth": int(depth),
                "exact": exact}

    def _meta(self, key: str) -> EntryMeta:
        m = self.meta.get(key)
        if m is None:  # an entry added without metadata (should not happen): a fresh version
            m = self.meta[key] = EntryMeta(uuid.uuid4().hex)
        return m

    def add_hot(self, key: str, uid: str, replica: str) -> bool:
        """``replica`` now holds a hot copy of ``key`` at version ``uid``."""
        m = self.meta.get(key)
        if m is None or m.uid != uid:
            return False
        if replica in self._dead:  # a dead replica's late report (sent before it died)
            self.counters["late_hot_refused"] += 1
            return False
        m.hot.add(replica)
        return True

    def drop_hot(self, items: list, replica: str) -> int:
        """``replica`` evicted its hot copies of ``[(key, uid), ...]``."""
        n = 0
        for key, uid in items:
            m = self.meta.get(key)
            if m is not None and m.uid == uid and replica in m.hot:
                m.hot.discard(replica)
                n += 1
        return n

    def drop_holders(self, replicas: list) -> int:
        """``replicas`` (``ReplicaID.unique_id``s) are gone (dead, or left the replica set):
        they hold no hot copy any more. Removes them from every entry's ``hot``; the entries
        stay (their KV is in the object store, owned by this actor: served cold from now on).
        Returns how many hot listings were removed. Idempotent (several routers may report
        the same death). Counted in the stats: ``dead_holders`` (distinct replicas reported),
        ``dropped_hot`` (listings removed)."""
        gone = {str(r) for r in replicas if r}
        if not gone:
            return 0
        n = 0
        for m in self.meta.values():
            if m.hot & gone:
                n += len(m.hot & gone)
                m.hot -= gone
        new = [r for r in gone if r not in self._dead]
        for r in new:
            self._dead[r] = None
        while len(self._dead) > self.MAX_DEAD:
            self._dead.pop(next(iter(self._dead)))
        self.counters["dead_holders"] += len(new)
        self.counters["dropped_hot"] += n
        return n

    def drop_replica(self, replica: str) -> int:
        """``replica`` is gone: it holds no hot copy any more (:meth:`drop_holders` of one)."""
        return self.drop_holders([replica])

    def report_lost(self, key: str) -> bool:
        """A caller could not fetch ``key``'s object: drop the entry and count it."""
        self.counters["lost_objects"] += 1
        return self.remove(key)

    def report_bad(self, key: str, reason: str = "corrupt", uid: Optional[str] = None) -> bool:
        """A caller rejected ``key``'s object (``corrupt``: malformed / truncated; ``mismatch``:
        another model's KV; ``reuse_error``: the engine failed on it; ``bad_logits``: non-finite
        first-token logits): drop the entry and count it. With ``uid``, only that version
        (a newer registration under the same key is kept)."""
        if uid is not None and key in self.meta and self.meta[key].uid != uid:
            return False
        name = {"mismatch": "mismatched_objects", "reuse_error": "reuse_errors"}.get(reason, "corrupt_objects")
        self.counters[name] = self.counters.get(name, 0) + 1
        return self.remove(key)

    def remove(self, key: str) -> bool:
        e = self.index.remove(key)
        self._forget([e])
        return e is not None

    def inject_fault(self, key: str, kind: str) -> bool:
        """Fault injection for tests and chaos drills: damage ``key``'s stored object in place.

        ``lose``: the entry now points at an object whose owner has died (``OwnerDiedError``
        on get); ``truncate``: a PackedKV whose array lost half its tokens (unpickling skips
        validation); ``corrupt_bytes`` / ``truncate_bytes``: the CRC-checked wire format
        with one flipped byte / cut in half; ``foreign``: the signature of another model;
        ``nan_logits``: first-token logits with NaNs (an identical prompt would replay them).
        The entry keeps its metadata, so the next lookup still finds it, under a new
        version (``uid``): replicas' hot copies of the old, intact object no longer match.
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
            elif kind == "nan_logits":
                if packed.last_logits is None:
                    raise ValueError("nan_logits needs an exact entry (with first-token logits)")
                bad_logits = np.array(packed.last_logits, dtype=np.float32)
                bad_logits[::7] = np.nan
                e.payload = ray.put(PackedKV(packed.data, packed.dtype, packed.token_ids, packed.signature, bad_logits))
            elif kind == "foreign":
                from dataclasses import replace

                e.payload = ray.put(PackedKV(packed.data, packed.dtype, packed.token_ids,
                                             replace(packed.signature, weights="0" * 16)))
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
        m = self._meta(key)
        m.uid, m.hot = uuid.uuid4().hex, set()
        self.counters["injected_faults"] += 1
        return True

    def clear(self, tenant: Optional[str] = None) -> int:
        removed = self.index.clear(tenant)
        self._forget(removed)
        return len(removed)

    # reads -----------------------------------------------------------------------
    def lookup(self, vector: np.ndarray, tenant: str = "default", threshold: float = 0.3,
               prefer_exact_margin: float = 0.0, candidates: int = 8) -> Optional[LookupResult]:
        """Best entry of ``tenant`` only, if its similarity >= ``threshold``.

        When the best is approximate (depth > 0) and an exact entry is within
        ``prefer_exact_margin`` of its similarity, the exact one is returned instead:
        errors must not compound along chains of reuse.
        """
        found = [(e, s) for e, s in self.index.search(vector, tenant, k=max(1, candidates)) if s >= threshold]
        if not found:
            self.index.counters["misses"] += 1
            self._tc(tenant)["misses"] += 1
            return None
        entry, sim = found[0]
        best = self._meta(entry.key)
        if best.depth > 0 and prefer_exact_margin > 0:
            for e, s in found[1:]:
                if s < sim - prefer_exact_margin:
                    break
                if self._meta(e.key).depth == 0:
                    entry, sim = e, s
                    self.counters["preferred_exact"] = self.counters.get("preferred_exact", 0) + 1
                    break
        self._touch(entry)
        self._tc(tenant)["hits"] += 1
        m = self._meta(entry.key)
        return LookupResult(entry.key, m.uid, float(sim), int(entry.token_ids.shape[0]), m.depth, m.exact,
                            sorted(m.hot), [entry.payload])

    def lookup_sources(self, vector: np.ndarray, token_ids: np.ndarray, tenant: str = "default",
                       threshold: float = 0.3, prefer_exact_margin: float = 0.0, candidates: int = 8,
                       max_sources: int = 4, min_gain: float = 0.05, ngram: int = 3) -> Optional[list[LookupResult]]:
        """Several entries of ``tenant`` that together cover the prompt (a RAG-shaped prompt
        reuses every passage cached anywhere), best first; None on a miss.

        The first is exactly what :meth:`lookup` returns; the others come from the greedy
        n-gram cover of :meth:`SemanticIndex.lookup_sources` (each adds at least
        ``min_gain`` of the prompt's distinct ``ngram``-grams), at most ``max_sources`` in all.
        A prompt covered well by one entry gets that entry alone.
        """
        first = self.lookup(vector, tenant, threshold, prefer_exact_margin, candidates)
        if max_sources <= 1 or token_ids is None:
            return [first] if first is not None else None
        before = dict(self.index.counters)  # counted once, by lookup()
        cover = self.index.lookup_sources(vector, token_ids, tenant, threshold, k=max(candidates, max_sources),
                                          max_sources=max_sources, min_gain=min_gain, ngram=ngram)
        self.index.counters.update({k: before.get(k, 0) for k in ("hits", "misses")})
        out = [first] if first is not None else []
        for m in (cover.matches if cover is not None else []):
            if len(out) >= max_sources:
                break
            if any(r.key == m.entry.key for r in out):
                continue
            meta = self._meta(m.entry.key)
            out.append(LookupResult(m.entry.key, meta.uid, float(m.similarity), int(m.entry.token_ids.shape[0]),
                                    meta.depth, meta.exact, sorted(meta.hot), [m.entry.payload]))
        if len(out) > 1:
            self.counters["several_sources"] = self.counters.get("several_sources", 0) + 1
        return out or None

    def _touch(self, entry) -> None:
        """Mark ``entry`` used: LRU order and hit counters (what ``SemanticIndex.lookup`` does)."""
        self.index.touch(entry.key)
        entry.hits += 1
        self.index.counters["hits"] += 1

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
        out = []
        for e in self.index.entries():
            m = self._meta(e.key)
            out.append({"key": e.key, "tenant": e.tenant, "nbytes": e.nbytes, "tokens": int(e.token_ids.shape[0]),
                        "hits": e.hits, "created": e.created, "uid": m.uid, "depth": m.depth, "exact": m.exact,
                        "hot": sorted(m.hot)})
        return out

    def audit(self) -> dict:
        """Check the byte accounting against the stored objects themselves (slow; tests/ops)."""
        return _audit({"index_bytes": self.index.nbytes, "entries": list(self.index.entries())})

    def ping(self) -> dict:
        if self._node_id is None and ray.is_initialized():  # an actor never moves: read once
            self._node_id = ray.get_runtime_context().get_node_id()
        return {"ok": True, "entries": len(self.index), "uptime_s": round(time.time() - self.started, 3),
                "node_id": self._node_id}


@ray.remote(num_cpus=0)
class _Holder:
    """Owns an object, then is killed: leaves a ref whose owner is dead (``inject_fault``)."""

    def hold(self, nbytes: int) -> list:
        return [ray.put(np.zeros(max(1, min(int(nbytes), 1 << 20)), dtype=np.uint8))]


PUT_NICE_ENV = "SEMSHARE_INDEX_PUT_NICE"
DEFAULT_PUT_NICE = 19


def lower_thread_priority() -> None:
    """A put thread's start: lower its own priority (Linux: per-thread nice) to
    ``SEMSHARE_INDEX_PUT_NICE`` (default 19; 0 keeps the worker's own), so that when the
    cores are busy the event loop's lookups run before a registration's copy. Measured
    (benchmarks/index_load.py, 10 paired rounds): lookup p99 under 4 clients registering
    2k-token prompts 20.6 / 22.5 ms -> 16.0 / 18.2 ms, lower in every pair, at the same
    registration rate."""
    raw = os.environ.get(PUT_NICE_ENV) or str(DEFAULT_PUT_NICE)
    try:
        nice = int(raw)
    except ValueError:
        logger.warning("%s=%r is not an integer; using %d", PUT_NICE_ENV, raw, DEFAULT_PUT_NICE)
        nice = DEFAULT_PUT_NICE
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(nice, 19))
    except (AttributeError, OSError) as e:  # not Linux, or not allowed: the copy keeps its priority
        logger.info("index put thread keeps its priority: %s", e)


class AsyncKVIndex:
    """The actor's class: :class:`KVIndex` behind an asyncio event loop, so that lookups never
    queue behind registrations.

    Every call but the slow ones runs on the loop, under one ``threading.Lock`` around the
    plain index (microseconds: a faiss search or an insert). ``register`` runs its
    ``ray.put`` (a copy of the whole KV into the object store: ~40 ms for a 2k-token
    SmolLM2 prompt, seconds for a long one on a big model) in a worker thread *without*
    the lock, then inserts under it; ``inject_fault`` (tests, drills) and ``audit`` (reads
    every object) run in a worker thread too. So a lookup waits at most for one insert,
    never for a copy. Measured with ``benchmarks/index_load.py``
    (``benchmarks/results/index-load.md``).
    """

    PUT_THREADS = 1  # concurrent ray.put copies: one core copies, the other serves lookups

    def __init__(self, *args, put_threads: Optional[int] = None, **kwargs):
        self.core = KVIndex(*args, **kwargs)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(put_threads or self.PUT_THREADS, thread_name_prefix="index-put",
                                        initializer=lower_thread_priority)

    async def _in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def register(self, key: str, vector: np.ndarray, token_ids: np.ndarray, packed: PackedKV,
                       tenant: str = "default", depth: int = 0, exact: Optional[bool] = None,
                       hot_replica: Optional[str] = None, uid: Optional[str] = None) -> dict:
        """:meth:`KVIndex.register`, the object-store copy off the loop and outside the lock."""
        with self._lock:
            refused = self.core.check_register(key, packed)
        if refused is not None:
            return refused
        exact = (packed.last_logits is not None and getattr(packed, "exact", True)) if exact is None else bool(exact)
        nbytes = packed.nbytes
        ref = await self._in_thread(ray.put, packed)
        del packed
        with self._lock:
            return self.core.commit_register(key, vector, token_ids, ref, nbytes, exact, tenant, depth,
                                             hot_replica, uid)

    def _locked_fault(self, key: str, kind: str) -> bool:
        with self._lock:
            return self.core.inject_fault(key, kind)

    async def inject_fault(self, key: str, kind: str) -> bool:
        """:meth:`KVIndex.inject_fault` in a worker thread (it gets and puts objects; holds the lock)."""
        return await self._in_thread(self._locked_fault, key, kind)

    async def audit(self) -> dict:
        """:meth:`KVIndex.audit` in a worker thread, on a snapshot of the entries (lookups go on)."""
        with self._lock:
            snapshot = {"index_bytes": self.core.index.nbytes, "entries": list(self.core.index.entries())}
        return await self._in_thread(_audit, snapshot)


def _audit(snapshot: dict) -> dict:
    recorded, actual, lost = 0, 0, []
    for e in snapshot["entries"]:
        recorded += e.nbytes
        try:
            obj = ray.get(e.payload, timeout=30)
            actual += len(obj) if isinstance(obj, (bytes, bytearray)) else obj.nbytes
        except Exception:  # noqa: BLE001 - report, never raise
            lost.append(e.key)
    return {"index_bytes": snapshot["index_bytes"], "sum_entry_nbytes": recorded, "sum_object_nbytes": actual,
            "entries": len(snapshot["entries"]), "lost": lost}


def _locked_method(name: str):
    fn = getattr(KVIndex, name)

    async def method(self, *args, **kwargs):
        with self._lock:
            return fn(self.core, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``KVIndex.{name}`` under the index lock, on the event loop (fast)."
    return method


for _name in ("lookup", "lookup_sources", "register_ref", "add_hot", "drop_hot", "drop_holders", "drop_replica", "report_lost", "report_bad",
              "remove", "clear", "stats", "entries", "ping"):
    setattr(AsyncKVIndex, _name, _locked_method(_name))


# The actor: restarts forever (comes back empty); a call made while it restarts is
# retried a few times rather than failing at once. num_cpus=0: it is light and must
# never wait for a CPU slot held by a model replica. Async (AsyncKVIndex): lookups run
# while registrations copy their KV into the object store.
IndexActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3, max_concurrency=64)(AsyncKVIndex)


INDEX_RESOURCES_ENV = "SEMSHARE_INDEX_RESOURCES"


def index_actor_options(name: str, namespace: str, detached: bool = True,
                        environ: Optional[dict] = None) -> dict:
    """``IndexActor.options(...)`` for the named actor.

    ``SEMSHARE_INDEX_RESOURCES`` (JSON, e.g. ``{"semshare_index": 0.001}``) adds custom
    resource demands: give that resource only to the head node (``ray start --resources``)
    and the actor, its restarts included, always lands there, next to the object store
    sized for ``index_max_bytes`` (``deploy/rayservice.yaml``). Set it in every pod's
    environment: whichever replica creates the actor first applies it.
    """
    opts: dict = dict(name=name, namespace=namespace, get_if_exists=True)
    if detached:
        opts["lifetime"] = "detached"
    raw = (os.environ if environ is None else environ).get(INDEX_RESOURCES_ENV)
    if raw:
        try:
            res = json.loads(raw)
            if not isinstance(res, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                                    for k, v in res.items()):
                raise ValueError("expected a JSON object of resource name -> positive amount")
        except ValueError as e:
            raise ValueError(f"{INDEX_RESOURCES_ENV}={raw!r}: {e}") from None
        opts["resources"] = {k: float(v) for k, v in res.items()}
    return opts


def get_or_create_index_actor(name: str, namespace: str, dim: int, max_items: int, max_bytes: int,
                              tenant_max_items: Optional[int] = None, tenant_max_bytes: Optional[int] = None,
                              detached: bool = True) -> Any:
    """The named index actor, created on first use (``get_if_exists`` makes it race-free).

    Detached, so it outlives the replica that created it (a non-detached actor would
    fate-share with its creator) and survives app redeploys. The first creator's caps win.
    Placement: :func:`index_actor_options` (``SEMSHARE_INDEX_RESOURCES``).
    """
    opts = index_actor_options(name, namespace, detached)
    return IndexActor.options(**opts).remote(dim, max_items, max_bytes, tenant_max_items, tenant_max_bytes)
