"""App builder: ``serve run serve_app.app:build_app [key=value ...]`` or ``serve_config.yaml``.

``build_app(args)`` validates the args (:class:`serve_app.settings.AppArgs`, a preset
from ``configs/`` overlaid by explicit keys) and binds::

    Ingress (FastAPI, 1 replica)  ->  SemShareServer (num_replicas, num_cpus / num_gpus each)
                                          -> IndexActor (named, detached, created on first use)

With ``affinity`` (default) the model deployment uses the cache-affinity request router
(:mod:`serve_app.affinity_router`).
"""
from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .affinity_router import CacheAffinityRouter
from .ingress import Ingress
from .llm_server import SemShareServer
from .settings import AppArgs, resolve_args


def build_app(args: dict | None = None) -> Application:
    a: AppArgs = resolve_args(args)
    d = a.model_dump()
    actor_opts = {"num_cpus": a.num_cpus}
    if a.num_gpus:
        actor_opts["num_gpus"] = a.num_gpus
    router = {}
    if a.affinity:
        router["request_router_config"] = RequestRouterConfig(
            request_router_class=CacheAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": a.affinity_imbalance_threshold})
    llm = SemShareServer.options(
        **router,
        num_replicas=a.num_replicas,
        ray_actor_options=actor_opts,
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
    ).bind(d)
    return Ingress.options(
        num_replicas=a.ingress_num_replicas,
        ray_actor_options={"num_cpus": a.ingress_num_cpus},
        # headroom over the in-app admission limit (which answers a JSON 503 + Retry-After),
        # so health / stats still get through and Serve's plain-text 503 stays out of reach
        max_ongoing_requests=max(a.ingress_max_ongoing_requests, a.max_concurrent_requests + 16),
        max_queued_requests=max(a.max_queued_requests, 64) if a.max_queued_requests >= 0 else -1,
    ).bind(llm, d)


__all__ = ["build_app", "AppArgs"]
