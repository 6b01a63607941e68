"""App builder: ``serve run serve_app.app:build_app [key=value ...]`` or ``serve_config.yaml``.

``build_app(args)`` validates the args (:class:`serve_app.settings.AppArgs`, a packaged
preset overlaid by explicit keys) and binds::

    Ingress (FastAPI, 1 replica)  ->  SemShareServer (num_replicas, or autoscaling_config; num_cpus / num_gpus each)
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
from .observability import serve_logging_config
from .settings import AppArgs, resolve_args


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def model_deployment_options(a: AppArgs) -> dict:
    """``SemShareServer.options(...)`` for the validated args (exposed for tests and tooling)."""
    actor_opts = {"num_cpus": a.num_cpus}
    if a.num_gpus:
        actor_opts["num_gpus"] = a.num_gpus
    if a.huge_pages:  # torch reads it once, at its first allocation: it must be in the process's start env
        actor_opts["runtime_env"] = {"env_vars": {HUGE_PAGES_ENV: "1"}}
    opts = {"ray_actor_options": actor_opts, "max_ongoing_requests": a.max_ongoing_requests,
            "max_queued_requests": a.max_queued_requests}
    if a.affinity:  # cache-affinity routing (serve_app/affinity_router.py)
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=CacheAffinityRouter,
            request_router_kwargs={"imbalanced_threshold": a.affinity_imbalance_threshold,
                                   # where the router reports replicas that left (KVIndex.drop_holders)
                                   "index_name": a.index_name, "index_namespace": a.index_namespace})
    if a.autoscaling_config is not None:
        opts["autoscaling_config"] = a.autoscaling_config.serve_config()
    else:
        opts["num_replicas"] = a.num_replicas
    log = serve_logging_config(a.log_format)
    if log:
        opts["logging_config"] = log
    return opts


def ingress_deployment_options(a: AppArgs) -> dict:
    opts = {
        "num_replicas": a.ingress_num_replicas,
        "ray_actor_options": {"num_cpus": a.ingress_num_cpus},
        # Serve counts a request against the replica from the moment the proxy forwards it,
        # i.e. while its body is still arriving. Room for: the generation admission limit
        # (answered with a JSON 503 in the app), the pool of requests still receiving their
        # body (408 at body_timeout_s, 503 beyond the pool), and headroom so health, ready,
        # models and stats always get a slot (Serve's plain-text 503 stays out of reach).
        "max_ongoing_requests": max(a.ingress_max_ongoing_requests,
                                    a.max_concurrent_requests + a.max_receiving_requests + 32),
        "max_queued_requests": max(a.max_queued_requests, 64) if a.max_queued_requests >= 0 else -1,
    }
    log = serve_logging_config(a.log_format)
    if log:
        opts["logging_config"] = log
    return opts


def build_app(args: dict | None = None) -> Application:
    a: AppArgs = resolve_args(args)
    d = a.model_dump()
    llm = SemShareServer.options(**model_deployment_options(a)).bind(d)
    return Ingress.options(**ingress_deployment_options(a)).bind(llm, d)


__all__ = ["build_app", "AppArgs", "model_deployment_options", "ingress_deployment_options"]
