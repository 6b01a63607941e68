"""The reuse path: lookup -> fetch -> check -> hot tier -> prefill -> register.

* :class:`IndexClient`: the named index actor, resolved lazily, every call bounded by a
  timeout; an unreachable or slow index is a miss, never a failed request.
* :class:`ReusePath` (one per replica): given the index's answer (a
  :class:`~serve_app.protocol.Reference`, looked up by the ingress), get the reference
  KV ready for the engine:

  - **hot**: the replica-local tier (:mod:`serve_app.hot_tier`) holds it, converted
    and on the engine device: no object-store get, no validation, no conversion;
  - **cold**: ``await ref`` (object store, zero-copy on the same node), check it
    (:func:`serve_app.kvcheck.load_reference`); the request reads it in place and drops
    its views once prefilled (:meth:`Ready.release`), while a worker thread copies it
    into the replica's own memory (and to the device) for the hot tier (the index learns
    this replica holds it: the router will prefer it). Nothing long-lived holds a view
    into the object store, so an entry the index evicts leaves the store.

  A lost / corrupt / foreign object is a full prefill, and the entry is reported to the
  index (dropped there, and from the hot tier), so later requests stop fetching it. An
  engine failure on a well-formed entry (out of memory, ...) is a full prefill too, but
  the entry stays (:meth:`ReusePath.reuse_failed`).

  Registration (:meth:`ReusePath.register`) starts right after the prefill, in a worker
  thread, while decoding runs; the replica awaits it before its final event, so a
  ``store_key`` named in a response can be found by the next lookup (read-your-writes).
  The exported KV goes into the hot tier as is (on the CPU the device tensor is a view
  of it); the index actor ``ray.put``s it once (it must own the object so that entries
  outlive the replica; Ray >= 2.56 has no ``ray.put(_owner=)`` to skip that copy).

  Derivation depth: an entry is 0 when its KV is a full prefill's, else its
  reference's depth + 1. Past ``max_reuse_depth`` the approximate KV is not
  registered; with ``depth_cap_policy="refresh"`` (or an explicit ``store_key``) an
  exact prefill is registered instead.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from semshare_core import KVFormatError, KVMismatchError
from semshare_core.staging import HostStaging

from .hot_tier import HotEntry, HotTier, default_hot_bytes, device_kv, entry_bytes, private_copy
from .index_actor import get_or_create_index_actor
from .kv_owner import get_or_create_kv_owner
from .kvcheck import load_reference
from .protocol import Reference
from .settings import AppArgs

logger = logging.getLogger("ray.serve")


def signature_digest(signature) -> str:
    """Short digest of a :class:`~semshare_core.kv.ModelSignature` (all its fields)."""
    blob = json.dumps(dataclasses.asdict(signature), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def index_namespace(args: AppArgs, digest: str) -> str:
    """The configured namespace, or by default one per model signature."""
    return args.index_namespace or f"semshare-{digest}"


class IndexClient:
    """Lazily resolved handle to the index actor, with bounded calls.

    ``namespace``: the index's Ray namespace, or an async callable giving it (the ingress
    asks a replica for the model signature once).
    """

    def __init__(self, args: AppArgs, dim: int, namespace=None):
        self.args, self.dim = args, dim
        self._namespace = namespace if namespace is not None else args.index_namespace
        self._handle = None

    @property
    def known_namespace(self) -> Optional[str]:
        """The namespace if already resolved (no call to a replica), else None."""
        return self._namespace if isinstance(self._namespace, str) else None

    async def namespace(self) -> str:
        if not isinstance(self._namespace, str):
            self._namespace = await self._namespace()
        return self._namespace

    def _resolve(self, namespace: Optional[str] = None):
        a = self.args
        return get_or_create_index_actor(a.index_name, namespace or self._namespace, self.dim, a.index_max_items,
                                         a.index_max_bytes, a.tenant_max_items, a.tenant_max_bytes)

    def resolve_now(self):
        """Synchronous (start-up): create / resolve the actor so the first request does not wait."""
        if self._handle is None:
            self._handle = self._resolve()
        return self._handle

    async def handle(self):
        if self._handle is None:
            ns = await self.namespace()
            self._handle = await asyncio.to_thread(self._resolve, ns)
        return self._handle

    def reset(self) -> None:
        self._handle = None

    async def call(self, method: str, *args, timeout: Optional[float] = None, **kw) -> Any:
        """Raises on failure (callers decide). A dead actor (this handle's actor was killed for
        good; someone may have re-created it under the name) is re-resolved and retried once."""
        for attempt in (0, 1):
            try:
                h = await self.handle()
                return await asyncio.wait_for(getattr(h, method).remote(*args, **kw),
                                              timeout or self.args.lookup_timeout_s * 5)
            except RayActorError:
                self.reset()
                if attempt:
                    raise

    async def lookup(self, vec: np.ndarray, tenant: str, threshold: float,
                     ids: Optional[np.ndarray] = None,
                     max_sources: int = 1) -> tuple[Optional[Reference], Optional[str], list[Reference]]:
        """``(Reference | None, fallback_reason | None, more sources)``; never raises.

        With ``max_sources`` > 1 (and the prompt's ``ids``) the index may add entries that
        cover other parts of the prompt (:meth:`KVIndex.lookup_sources`)."""
        try:
            if max_sources > 1 and ids is not None:
                cfg = self.args.semshare_config()
                res = await self.call("lookup_sources", vec, ids, tenant, threshold, self.args.prefer_exact_margin,
                                      8, max_sources, cfg.source_min_gain, cfg.ngram,
                                      timeout=self.args.lookup_timeout_s)
                return (res[0], None, list(res[1:])) if res else (None, None, [])
            res = await self.call("lookup", vec, tenant, threshold, self.args.prefer_exact_margin,
                                  timeout=self.args.lookup_timeout_s)
            return res, None, []
        except (asyncio.TimeoutError, GetTimeoutError):
            logger.warning("index lookup timed out after %.1fs: full prefill", self.args.lookup_timeout_s)
            return None, "index_unavailable", []
        except RayActorError as e:
            logger.warning("index actor unavailable (%s): full prefill", type(e).__name__)
            return None, "index_unavailable", []
        except Exception:  # noqa: BLE001 - the cache is an optimisation, never a failure
            logger.exception("index lookup failed: full prefill")
            self.reset()
            return None, "index_unavailable", []


@dataclass
class Ready:
    """A reference ready for ``engine.prefill``."""

    ref: Reference
    packed: Any               # checked PackedKV
    kv: Optional[torch.Tensor]  # on the engine device; None: the engine stages rows from ``packed``
    tier: str                 # "hot" | "cold"
    fetch_ms: float = 0.0     # object-store get
    check_ms: float = 0.0     # validation
    convert_ms: float = 0.0   # to the device

    def release(self) -> None:
        """Once prefilled: stop borrowing the object (its ObjectRef) and drop ``packed`` /
        ``kv`` (cold: zero-copy views into the object store, which they keep pinned)."""
        self.ref.refs.clear()
        self.packed = self.kv = None


class ReusePath:
    """One replica's side of reuse (see module docstring). ``count(reason)`` records fallbacks."""

    MAX_BAD_UIDS = 1024  # entry versions reported bad, remembered (their admissions are refused)

    def __init__(self, engine, args: AppArgs, replica: str, index: IndexClient, count=None):
        self.engine, self.args, self.replica, self.index = engine, args, replica, index
        self.count = count or (lambda reason: None)
        cap = args.hot_tier_bytes
        if cap is None:
            weights = sum(p.numel() * p.element_size() for p in engine.model.parameters()) \
                if hasattr(engine, "model") else 0
            kv = 0 if engine.device.type == "cpu" else (args.scheduler_config(engine.device).kv_budget_bytes or 0)
            cap = default_hot_bytes(engine.device, args.num_gpus, weights, kv)
        self.hot = HotTier(cap, on_evict=self._on_evict)
        self.pinned = HostStaging(engine.device)  # hot-tier admission on an accelerator (pinned, reused)
        self._pinned_lock = threading.Lock()
        self._pending: set[asyncio.Task] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.counters = {"hot_hits": 0, "cold_hits": 0, "registered": 0, "register_errors": 0,
                         "not_registered_depth": 0, "refreshed_exact": 0, "kv_owner_errors": 0}
        self._owner = None  # this node's KVOwner handle (resolved on the first registration)
        # who puts registrations: "node" (the node's KVOwner) or "index"; start_kv_owner
        # resolves "auto" (without it: the owner unless the setting says index)
        self._owner_mode = "index" if args.kv_owner == "index" else "node"
        self.register_ms: list[float] = []  # recent registration times (bounded)
        self._bad_uids: OrderedDict[str, None] = OrderedDict()  # versions reported bad: never admitted hot

    # background tasks ------------------------------------------------------------
    def spawn(self, coro) -> asyncio.Task:
        loop = asyncio.get_running_loop()
        self._loop = loop
        task = loop.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    @property
    def pending(self) -> set:
        return self._pending

    def _on_evict(self, entries: list[HotEntry]) -> None:
        """Hot copies left this replica: tell the index (the router stops preferring us)."""
        items = [(e.key, e.uid) for e in entries]
        loop = self._loop
        if loop is None or not items:
            return

        def go():
            self.spawn(self._call_quiet("drop_hot", items, self.replica))
        try:
            if asyncio.get_running_loop() is loop:
                go()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(go)

    async def _call_quiet(self, method: str, *args) -> None:
        try:
            await self.index.call(method, *args)
        except Exception as e:  # noqa: BLE001 - advisory
            logger.info("index %s failed: %s: %s", method, type(e).__name__, e)

    async def report_bad(self, ref: Reference, reason: str) -> None:
        """Drop a bad entry everywhere: here (hot tier) and in the index (counted there)."""
        self._bad_uids[ref.uid] = None  # an admission still copying it must not bring it back
        while len(self._bad_uids) > self.MAX_BAD_UIDS:
            self._bad_uids.popitem(last=False)
        self.hot.drop_key(ref.key)
        try:
            if reason == "lost":
                await self.index.call("report_lost", ref.key)
            else:
                await self.index.call("report_bad", ref.key, reason, ref.uid)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not report %s entry %s: %s", reason, ref.key, e)

    # fetch -------------------------------------------------------------------------
    async def acquire(self, ref: Reference) -> tuple[Optional[Ready], Optional[str]]:
        """``(Ready | None, fallback_reason | None)``; never raises."""
        e = self.hot.get(ref.uid)
        if e is not None:
            self.counters["hot_hits"] += 1
            return Ready(ref, e.packed, e.kv, "hot"), None
        # the index's version of the key is ref.uid: any other version held here is stale
        # (the entry was evicted or removed, then registered again)
        self.hot.drop_key(ref.key, keep=ref.uid)
        if not ref.refs:
            return None, self.count("lost_objects")
        t0 = time.perf_counter()
        try:
            obj = await asyncio.wait_for(ref.refs[0], self.args.kv_get_timeout_s)
        except (ObjectLostError, asyncio.TimeoutError, GetTimeoutError) as ex:
            logger.warning("reference KV %s unavailable (%s): full prefill", ref.key, type(ex).__name__)
            self.spawn(self.report_bad(ref, "lost"))
            return None, self.count("lost_objects")
        except RayActorError as ex:
            logger.warning("reference KV %s owner unavailable (%s): full prefill", ref.key, type(ex).__name__)
            return None, self.count("lost_objects")
        except Exception as ex:  # noqa: BLE001 - e.g. an object that cannot be deserialised
            logger.warning("reference KV %s unreadable (%s): full prefill", ref.key, type(ex).__name__)
            self.spawn(self.report_bad(ref, "corrupt"))
            return None, self.count("kv_corrupt")
        t1 = time.perf_counter()
        try:
            packed = await asyncio.to_thread(load_reference, obj, self.engine.signature, ref.ref_token_count)
        except KVMismatchError as ex:
            logger.warning("reference %s is from another model (%s): full prefill", ref.key, ex)
            self.spawn(self.report_bad(ref, "mismatch"))
            return None, self.count("kv_mismatch")
        except Exception as ex:  # noqa: BLE001 - KVFormatError and anything odd: never trust it
            logger.warning("reference %s rejected (%s: %s): full prefill", ref.key, type(ex).__name__, ex)
            self.spawn(self.report_bad(ref, "bad_logits" if "logits" in str(ex) else "corrupt"))
            return None, self.count("kv_corrupt")
        finally:
            del obj
        t2 = time.perf_counter()
        self.counters["cold_hits"] += 1
        # the request reads the fetched object in place (zero-copy: Ready.release drops it once
        # prefilled); the hot tier gets a private copy, made off the request's path
        if self.engine.device.type != "cpu":
            # on an accelerator the engine stages just the rows it needs, per layer, through
            # pinned buffers overlapped with compute (host_staging); the whole entry goes to
            # the hot tier afterwards, through a reusable pinned buffer
            self.spawn(asyncio.to_thread(self._admit_pinned, ref, packed))
            return Ready(ref, packed, None, "cold", (t1 - t0) * 1e3, (t2 - t1) * 1e3, 0.0), None
        kv = device_kv(packed, self.engine.device, self.engine.dtype)  # a view on the CPU
        t3 = time.perf_counter()
        self.spawn(asyncio.to_thread(self._admit_host, ref, packed))
        return Ready(ref, packed, kv, "cold", (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3), None

    def _admit_host(self, ref: Reference, packed) -> None:
        """CPU: copy a cold-fetched entry out of the object store into this process's memory
        and keep it hot (worker thread; the index learns this replica holds it)."""
        try:
            own = private_copy(packed)
            self._admitted(ref, own, device_kv(own, self.engine.device, self.engine.dtype))
        except Exception as e:  # noqa: BLE001 - the hot tier is an optimisation
            logger.info("hot-tier admission of %s failed: %s: %s", ref.key, type(e).__name__, e)

    def _admit_pinned(self, ref: Reference, packed) -> None:
        """Accelerator: copy a cold-fetched entry to the device through the reusable pinned
        buffer, and its host arrays out of the object store, and keep it hot (worker thread;
        the index learns this replica holds it)."""
        try:
            src = packed.to_torch("cpu")
            idx = torch.arange(src.shape[3])
            with self._pinned_lock:
                kv = self.pinned.gather(src, 3, idx).to(dtype=self.engine.dtype)
            self._admitted(ref, private_copy(packed), kv)
        except Exception as e:  # noqa: BLE001 - the hot tier is an optimisation
            logger.info("hot-tier admission of %s failed: %s: %s", ref.key, type(e).__name__, e)

    def _admitted(self, ref: Reference, own, kv: torch.Tensor) -> None:
        """Worker thread: keep ``own`` (private host arrays) and ``kv`` hot; tell the index.
        Not if the version was reported bad meanwhile (checked after the insert: whichever
        runs first, :meth:`report_bad`'s drop or this check removes it)."""
        if not self._keep_hot(ref.key, ref.uid, own, kv, ref.depth, ref.exact):
            return
        if ref.uid in self._bad_uids:
            self.hot.drop(ref.uid)
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                lambda: self.spawn(self._call_quiet("add_hot", ref.key, ref.uid, self.replica)))

    def _keep_hot(self, key: str, uid: str, packed, kv: torch.Tensor, depth: int, exact: bool) -> bool:
        """``packed`` must be this process's memory (an export, or :func:`private_copy`)."""
        return self.hot.put(HotEntry(uid, key, packed, kv, entry_bytes(packed, kv), int(depth), bool(exact)))

    # failures ------------------------------------------------------------------------
    def reuse_failed(self, ready: Ready, e: BaseException) -> str:
        """The engine failed on a reference (the request went on as a full prefill): the
        fallback reason. Only a reference that is bad in itself (another model, malformed,
        non-finite) is reported and dropped everywhere; any other failure (out of memory,
        a bug) keeps the entry: it is not the entry's fault."""
        if isinstance(e, (KVMismatchError, KVFormatError)):
            mismatch = isinstance(e, KVMismatchError)
            logger.warning("reference %s does not fit this model (%s): full prefill", ready.ref.key, e)
            self.spawn(self.report_bad(ready.ref, "mismatch" if mismatch else "corrupt"))
            return self.count("kv_mismatch" if mismatch else "kv_corrupt")
        logger.warning("reuse prefill with %s failed (%s: %s): full prefill; the entry is kept", ready.ref.key,
                       type(e).__name__, e)
        return self.count("reuse_error")

    # register ------------------------------------------------------------------------
    def plan_depth(self, pre, ref: Optional[Reference]) -> tuple[int, bool]:
        """``(depth, refresh)``: the depth the prompt's KV would have; whether to register an
        exact prefill instead (past the cap)."""
        if pre.exact or ref is None:
            return 0, False
        return ref.depth + 1, ref.depth + 1 > self.args.max_reuse_depth

    def start_export(self, pre) -> asyncio.Task:
        """Export the prefill's KV (and its device copy) in a worker thread, now; the decode
        runs on its own copy meanwhile. The prompt's full KV is released once exported."""
        def work():
            try:
                packed = self.engine.export_kv(pre)
                return packed, self._device_copy(pre, packed), bool(pre.exact)
            finally:
                pre.release_full_kv()
        return self.spawn(asyncio.to_thread(work))

    async def register(self, key: str, vec: np.ndarray, ids: np.ndarray, tenant: str, depth: int,
                       export: asyncio.Task) -> dict:
        """Keep the exported KV hot and register it with the index. Never raises."""
        t0 = time.perf_counter()
        try:
            packed, kv, exact = await export
            t1 = time.perf_counter()
            uid = uuid.uuid4().hex
            depth = 0 if exact else depth
            self._keep_hot(key, uid, packed, kv, depth, exact)
            out = await self._register_kv(key, vec, ids, packed, tenant, depth, exact, uid)
            del packed
            ms = (time.perf_counter() - t0) * 1e3
            self.register_ms = (self.register_ms + [ms])[-256:]
            if out.get("stored"):
                self.counters["registered"] += 1
                for old in out.get("evicted_uids", ()):  # evicted to make room: never looked up again
                    self.hot.drop(old)
            else:
                self.hot.drop(uid)
                logger.info("entry %s not stored: %s", key, out.get("reason"))
            return {**out, "register_ms": round(ms, 3), "export_wait_ms": round((t1 - t0) * 1e3, 3)}
        except Exception as e:  # noqa: BLE001 - never fails the request, never silent
            self.counters["register_errors"] += 1
            if isinstance(e, RayActorError):
                self.index.reset()
            logger.warning("registering %s failed: %s: %s", key, type(e).__name__, e)
            return {"key": key, "stored": False, "reason": f"{type(e).__name__}",
                    "register_ms": round((time.perf_counter() - t0) * 1e3, 3)}

    async def _register_kv(self, key: str, vec, ids, packed, tenant: str, depth: int, exact: bool,
                           uid: str) -> dict:
        """Store ``packed`` and index it. ``kv_owner`` node: the node's
        :class:`~serve_app.kv_owner.KVOwner` puts it in this node's store and the index gets
        only the ref; index (or if the owner fails): the index actor puts it."""
        timeout = self.args.register_timeout_s
        if self._owner_mode == "node":
            nbytes = packed.nbytes  # over the index's byte cap: refused there (counted), the copy freed
            try:
                owner = await self._kv_owner()
                # not awaited here: the index call takes the put's result ([ref]) as an argument,
                # so Ray starts it once the put is done (one round trip from here, not two)
                refs = owner.put.remote(packed)
                return await self.index.call("register_ref", key, vec, ids, refs, nbytes, exact, tenant, depth,
                                             self.replica, uid, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - an optimisation: the index actor can still store it
                self._owner = None
                self.counters["kv_owner_errors"] += 1
                logger.warning("registering %s through the node's KV owner failed (%s: %s): the index actor "
                               "stores it", key, type(e).__name__, e)
        return await self.index.call("register", key, vec, ids, packed, tenant, depth, exact, self.replica, uid,
                                     timeout=timeout)

    def start_kv_owner(self, timeout: float = 120.0) -> str:
        """Constructor: decide who puts registrations (``kv_owner``; auto: this node's owner
        only if the index actor runs on another node, where its put would copy the KV across
        the network) and, for the owner, create it and wait until it runs, so its process
        start-up (seconds: it imports the package) never falls on a registration."""
        ns = self.index.known_namespace
        mode = self.args.kv_owner
        me = ray.get_runtime_context().get_node_id()
        if mode == "auto":
            try:
                index_node = ray.get(self.index.resolve_now().ping.remote(), timeout=timeout).get("node_id")
            except Exception as e:  # noqa: BLE001 - unknown: the owner never costs a cross-node copy
                logger.warning("index actor not reachable at start-up (%s: %s)", type(e).__name__, e)
                index_node = None
            mode = "index" if index_node == me else "node"
        self._owner_mode = mode
        if mode == "node" and ns is not None:
            try:
                owner = get_or_create_kv_owner(self.args.index_name, ns, me)
                ray.get(owner.node_id.remote(), timeout=timeout)
                self._owner = owner
            except Exception as e:  # noqa: BLE001 - registrations resolve it again, or fall back
                logger.warning("KV owner not available at start-up (%s: %s)", type(e).__name__, e)
        logger.info("registrations are stored by %s", "this node's KV owner" if mode == "node" else
                    "the index actor (it runs on this node)")
        return mode

    async def _kv_owner(self):
        if self._owner is None:
            ns = await self.index.namespace()
            node = ray.get_runtime_context().get_node_id()
            self._owner = await asyncio.to_thread(get_or_create_kv_owner, self.args.index_name, ns, node)
        return self._owner

    def _device_copy(self, pre, packed) -> torch.Tensor:
        """The KV on the engine device: a view of the export on the CPU; on an accelerator
        stacked from the prefill's own device tensors (no host-to-device copy)."""
        dev = self.engine.device
        if dev.type == "cpu":
            return device_kv(packed, dev, self.engine.dtype)
        with torch.inference_mode():
            return torch.stack([torch.stack([k[0], v[0]]) for k, v in zip(pre.keys, pre.values)]).to(
                dtype=self.engine.dtype)

    def stats(self) -> dict:
        ms = sorted(self.register_ms)
        return {**self.counters, "hot": self.hot.stats(), "pending": len(self._pending), "kv_owner": self._owner_mode,
                "register_ms_p50": ms[len(ms) // 2] if ms else None}
