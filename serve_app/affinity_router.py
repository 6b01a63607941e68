"""Cache-affinity request routing (Ray Serve ``RequestRouter`` API).

The ingress looks the prompt up before routing (:mod:`serve_app.front`); the index's
answer names the replicas that hold the reference's KV hot
(:attr:`serve_app.protocol.ReplicaRequest.hot_replicas`). This router sends the
request to one of them, unless that replica's queue exceeds the least-loaded
candidate's by more than ``imbalanced_threshold`` (or is full): then it goes to the
least-loaded other replica, which fetches the KV cold from the object store (and
keeps it hot from then on). Requests without a hot holder are routed like Serve's
default power-of-two-choices router (:meth:`CacheAffinityRouter.two_choices`; only the
public ``ray.serve.request_router`` API is imported).

The load-balance test follows Ray Serve LLM's ``PrefixCacheAffinityRouter``: queue
lengths come from the router's queue-length cache, probing replicas missing from it
(a replica that does not answer in time is probed again with Serve's longer backoff
deadlines, up to three tries, before a holder is left for being unknown).

Replicas that leave the replica set leave the index too: when Serve shrinks the
router's replica set (``update_replicas``: the controller's update after a death,
scale-down or redeploy) or the router itself finds a replica dead
(``on_replica_actor_died``: an ``ActorDiedError`` while probing or sending), the router
tells the index actor (``KVIndex.drop_holders``), so entries stop naming the replica as
a hot holder; the entries stay, served cold. This mirrors Ray Serve LLM's
``PrefixCacheAffinityRouter`` (which removes such replicas from its prefix tree in the
same two hooks), except that the report is fire-and-forget on the router's event loop:
it never blocks routing and never raises into it; a failed report is retried at the
next change. The index actor is found by name: ``index_name`` / ``index_namespace``
(router kwargs); with the per-model default namespace, the router learns it from the
first request the ingress prepared (:attr:`serve_app.protocol.ReplicaRequest.index_namespace`).

Set on the model deployment (``serve_app.app.build_app``)::

    RequestRouterConfig(request_router_class=CacheAffinityRouter,
                        request_router_kwargs={"imbalanced_threshold": 2, "index_name": "semshare_index",
                                               "index_namespace": None})
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Iterable, List, Optional

import ray

# the public request-router surface only (ray.serve.request_router, alpha); Serve's own
# PowerOfTwoChoicesRequestRouter lives in ray.serve._private: its procedure is
# reimplemented in CacheAffinityRouter.two_choices on the public mixins
from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter,
                                      RunningReplica)

logger = logging.getLogger("ray.serve")


def hot_replicas_of(pending_request: Optional[PendingRequest]) -> list[str]:
    """Replica ids (``ReplicaID.unique_id``) holding the request's reference hot."""
    if pending_request is None or not pending_request.args:
        return []
    hot = getattr(pending_request.args[0], "hot_replicas", None)
    return list(hot) if isinstance(hot, (list, tuple)) else []


class CacheAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Prefer the replica holding the reference's hot copy; back off when it is busy."""

    MAX_PENDING_GONE = 4096  # replica ids waiting to be reported (the index may be unreachable)
    REPORT_TIMEOUT_S = 10.0
    REPORT_RETRY_S = 5.0  # a failed report is retried by a later request after this long

    def initialize_state(self, imbalanced_threshold: int = 2, affinity: bool = True,
                         index_name: Optional[str] = None, index_namespace: Optional[str] = None,
                         **_: Any) -> None:
        self._imbalanced_threshold = imbalanced_threshold
        self._affinity = affinity
        self._index_name, self._index_namespace = index_name, index_namespace
        self._index_handle = None
        self._gone_pending: dict[str, None] = {}  # ReplicaID.unique_id, insertion order
        self._report_task: Optional[asyncio.Task] = None
        self._report_retry_at = 0.0  # after a failed report: no retry from the request path before
        self.affinity_counters = {"hot_routed": 0, "hot_backoff": 0, "hot_unavailable": 0, "no_hot": 0,
                                  "replicas_gone": 0, "gone_reported": 0, "gone_report_errors": 0}

    # replicas leaving: tell the index (never blocks routing, never raises) ----------------
    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        old = set(self.curr_replicas)
        super().update_replicas(replicas)
        try:
            gone = old - set(self.curr_replicas)
            if gone:
                self._replicas_gone(gone)
        except Exception:  # noqa: BLE001 - bookkeeping must never break routing
            logger.exception("cache-affinity router: recording removed replicas failed")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        try:
            self._replicas_gone([replica_id])
        except Exception:  # noqa: BLE001
            logger.exception("cache-affinity router: recording a dead replica failed")

    def _replicas_gone(self, replica_ids: Iterable[ReplicaID]) -> None:
        for rid in replica_ids:
            uid = getattr(rid, "unique_id", None)
            if uid and uid not in self._gone_pending:
                self._gone_pending[uid] = None
                self.affinity_counters["replicas_gone"] += 1
        while len(self._gone_pending) > self.MAX_PENDING_GONE:
            self._gone_pending.pop(next(iter(self._gone_pending)))
        self._schedule_report()

    def _schedule_report(self) -> None:
        if not self._gone_pending or not self._index_name or not self._index_namespace:
            return  # nothing to say, or nowhere to say it yet (namespace learned from a request)
        if self._report_task is not None and not self._report_task.done():
            return  # the running report picks the new ids up
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop (tests): reported at the next change
            return
        self._report_task = loop.create_task(self.report_gone())

    async def _index(self):
        if self._index_handle is None:
            try:
                self._index_handle = await asyncio.to_thread(ray.get_actor, self._index_name,
                                                             namespace=self._index_namespace)
            except ValueError:  # no such actor: it holds no entry naming anyone
                return None
        return self._index_handle

    async def report_gone(self) -> int:
        """Report the pending gone replicas to the index; returns how many were reported.
        Keeps them pending when the index cannot be reached (retried at the next change)."""
        reported = 0
        try:
            while self._gone_pending and self._index_name and self._index_namespace:
                ids = list(self._gone_pending)
                handle = await self._index()
                if handle is not None:
                    await asyncio.wait_for(handle.drop_holders.remote(ids), self.REPORT_TIMEOUT_S)
                for uid in ids:
                    self._gone_pending.pop(uid, None)
                reported += len(ids)
                self.affinity_counters["gone_reported"] += len(ids)
        except Exception as e:  # noqa: BLE001 - the index is an optimisation; never raise into routing
            self.affinity_counters["gone_report_errors"] += 1
            self._index_handle = None
            self._report_retry_at = time.monotonic() + self.REPORT_RETRY_S
            logger.warning("cache-affinity router: could not report gone replicas to the index (%s: %s)",
                           type(e).__name__, e)
        return reported

    def _on_request(self, pending_request: Optional[PendingRequest]) -> None:
        """Learn the index namespace from a request; retry a failed or waiting report."""
        try:
            if self._index_namespace is None and pending_request is not None and pending_request.args:
                ns = getattr(pending_request.args[0], "index_namespace", None)
                if isinstance(ns, str) and ns:
                    self._index_namespace = ns
            if self._gone_pending and time.monotonic() >= self._report_retry_at:
                self._schedule_report()
        except Exception:  # noqa: BLE001 - never into routing
            logger.exception("cache-affinity router: gone-replica report scheduling failed")

    async def _queue_lens(self, replicas: List[RunningReplica]) -> dict[ReplicaID, int]:
        lens: dict[ReplicaID, int] = {}
        probe: List[RunningReplica] = []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                probe.append(r)
            else:
                lens[r.replica_id] = q
        for backoff in (0, 1, 2):  # Serve's deadline doubles per backoff step (0.1 s, then 0.2, 0.4)
            if not probe:
                break
            late = []
            for r, q in await self._probe_queue_lens(probe, backoff):
                if q is not None:
                    lens[r.replica_id] = q
                else:
                    late.append(r)
            # a replica slow to answer a probe (a busy 2-core box) is asked again with a
            # longer deadline before its affinity is given up
            probe = late
        return lens

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        self._on_request(pending_request)
        hot = set(hot_replicas_of(pending_request)) if self._affinity else set()
        if hot and not (pending_request is not None and pending_request.metadata.multiplexed_model_id):
            holders = [r for r in candidate_replicas if r.replica_id.unique_id in hot]
            if not holders:
                self.affinity_counters["hot_unavailable"] += 1  # holder dead or gone: route normally
            else:
                lens = await self._queue_lens(candidate_replicas)
                known = [q for q in lens.values()]
                lowest = min(known) if known else 0
                ok = [r for r in holders if r.replica_id in lens and lens[r.replica_id] < r.max_ongoing_requests
                      and lens[r.replica_id] - lowest <= self._imbalanced_threshold]
                others = [r for r in candidate_replicas if r not in ok]
                if ok:
                    self.affinity_counters["hot_routed"] += 1
                    ok.sort(key=lambda r: lens[r.replica_id])
                    return [ok, others] if others else [ok]
                self.affinity_counters["hot_backoff"] += 1
                # busy holder: the least-loaded other replica (it fetches cold); the holder last
                rest = [r for r in others if r not in holders]
                return [rest, holders] if rest else [holders]
        else:
            self.affinity_counters["no_hot"] += 1
        return await self.two_choices(candidate_replicas, pending_request)

    async def two_choices(self, candidate_replicas: List[RunningReplica],
                          pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        """Serve's default procedure (power of two choices), on the public mixins: replicas
        with the request's multiplexed model (or, without one, the locality-preferred ones),
        then two of them at random; Serve's router loop then sends to the one with the
        shorter queue that accepts."""
        model_id = getattr(getattr(pending_request, "metadata", None), "multiplexed_model_id", "")
        if pending_request is not None and model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        pool = [by_id[i] for i in ids if i in by_id] or list(candidate_replicas)
        if len(pool) <= 2:
            return [random.sample(pool, len(pool))] if pool else []
        return [random.sample(pool, 2)]
