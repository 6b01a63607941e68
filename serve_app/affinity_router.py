"""Cache-affinity request routing (Ray Serve ``RequestRouter`` API).

The ingress looks the prompt up before routing (:mod:`serve_app.front`); the index's
answer names the replicas that hold the reference's KV hot
(:attr:`serve_app.protocol.ReplicaRequest.hot_replicas`). This router sends the
request to one of them, unless that replica's queue exceeds the least-loaded
candidate's by more than ``imbalanced_threshold`` (or is full): then it goes to the
least-loaded other replica, which fetches the KV cold from the object store (and
keeps it hot from then on). Requests without a hot holder are routed like Serve's
default power-of-two-choices router.

The load-balance test follows Ray Serve LLM's ``PrefixCacheAffinityRouter``: queue
lengths come from the router's queue-length cache, probing replicas missing from it.

Set on the model deployment (``serve_app.app.build_app``)::

    RequestRouterConfig(request_router_class=CacheAffinityRouter,
                        request_router_kwargs={"imbalanced_threshold": 2})
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
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

    def initialize_state(self, imbalanced_threshold: int = 2, affinity: bool = True, **_: Any) -> None:
        self._imbalanced_threshold = imbalanced_threshold
        self._affinity = affinity
        self.affinity_counters = {"hot_routed": 0, "hot_backoff": 0, "hot_unavailable": 0, "no_hot": 0}

    async def _queue_lens(self, replicas: List[RunningReplica]) -> dict[ReplicaID, int]:
        lens: dict[ReplicaID, int] = {}
        probe: List[RunningReplica] = []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                probe.append(r)
            else:
                lens[r.replica_id] = q
        if probe:
            for r, q in await self._probe_queue_lens(probe, 0):
                if q is not None:
                    lens[r.replica_id] = q
        return lens

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
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
        return await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self, candidate_replicas=candidate_replicas, pending_request=pending_request)
