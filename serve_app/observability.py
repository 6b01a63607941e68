"""Ingress-side metrics (Prometheus, base units) and the per-request access log.

Metrics go through :mod:`ray.serve.metrics`: Ray exports them, prefixed ``ray_``, on
each node's metrics export port (see ``docs/serving.md``: "Metrics"). They are counted
at the ingress from the replica's final ``done`` event, so they cover every model
replica whatever its version:

=====================================  =========  ==========================================
name (as exported)                     type       meaning
=====================================  =========  ==========================================
``ray_semshare_http_requests_total``   counter    finished requests; tags ``route``, ``code``
                                                  (HTTP status), ``outcome`` (hit / miss /
                                                  off / error / cancelled)
``ray_semshare_prompt_tokens_total``   counter    prompt tokens of served requests
``ray_semshare_cached_tokens_total``   counter    of those, tokens taken from a cached KV
                                                  (approximate, semantic reuse)
``ray_semshare_completion_tokens_total`` counter  generated tokens
``ray_semshare_ttft_seconds``          histogram  time to first token at the ingress, seconds
``ray_semshare_requests_running``      gauge      generations in flight on this ingress replica
``ray_semshare_requests_receiving``    gauge      requests still sending their body
=====================================  =========  ==========================================

Token-level hit rate = ``rate(cached_tokens) / rate(prompt_tokens)``.

The access log: one line per request, written through ``ray.serve``'s logger so it lands
in the Ingress replica's log under ``<ray session>/logs/serve/``: ``access key=value ...``
or, with ``log_format: json`` (Serve's JSON encoding), a JSON record whose
``semshare_access`` object holds the fields. It carries ids, tenant, route, status,
outcome, similarity, token counts and timings; never prompt or output text.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ACCESS_FIELDS = ("request_id", "route", "status", "outcome", "tenant", "model", "replica", "cache_hit",
                 "similarity", "prompt_tokens", "reused_tokens", "completion_tokens", "ttft_s", "total_s",
                 "finish_reason", "fallback", "stream", "error")


def outcome_of(done: Optional[dict]) -> str:
    if done is None:
        return "error"
    if not done.get("used_semshare", True):
        return "off"
    return "hit" if done.get("cache_hit") else "miss"


class IngressMetrics:
    """The ingress's Prometheus metrics (created once per replica)."""

    def __init__(self, model: str):
        from ray.serve import metrics

        self.model = model
        self.requests = metrics.Counter(
            "semshare_http_requests", description="finished HTTP requests on the generation routes",
            tag_keys=("model", "route", "code", "outcome"))
        self.requests.set_default_tags({"model": model})
        self.prompt_tokens = metrics.Counter("semshare_prompt_tokens", description="prompt tokens served",
                                             tag_keys=("model",))
        self.prompt_tokens.set_default_tags({"model": model})
        self.cached_tokens = metrics.Counter(
            "semshare_cached_tokens", tag_keys=("model",),
            description="prompt tokens whose KV came from a cached reference (approximate, semantic reuse)")
        self.cached_tokens.set_default_tags({"model": model})
        self.completion_tokens = metrics.Counter("semshare_completion_tokens", tag_keys=("model",),
                                                 description="generated tokens")
        self.completion_tokens.set_default_tags({"model": model})
        self.ttft = metrics.Histogram("semshare_ttft_seconds", boundaries=TTFT_BUCKETS_S, tag_keys=("model",),
                                      description="time to first token at the ingress, seconds")
        self.ttft.set_default_tags({"model": model})
        self.running = metrics.Gauge("semshare_requests_running", tag_keys=("model",),
                                     description="generation requests in flight on this ingress replica")
        self.running.set_default_tags({"model": model})
        self.receiving = metrics.Gauge("semshare_requests_receiving", tag_keys=("model",),
                                       description="requests on this ingress replica still sending their body")
        self.receiving.set_default_tags({"model": model})
        # plain mirrors for /v1/cache/stats (admin) and tests
        self.totals = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}

    def finished(self, route: str, code: int, outcome: str, done: Optional[dict], ttft_s: Optional[float]) -> None:
        self.requests.inc(tags={"route": route, "code": str(code), "outcome": outcome})
        self.totals["requests"] += 1
        if done is not None:
            u = done.get("usage") or {}
            for name, key in (("prompt_tokens", "prompt_tokens"), ("cached_tokens", "reused_tokens"),
                              ("completion_tokens", "completion_tokens")):
                n = int(u.get(key) or 0)
                if n > 0:
                    getattr(self, name).inc(n)
                    self.totals[name] += n
        if ttft_s is not None and math.isfinite(ttft_s):
            self.ttft.observe(ttft_s)

    def gauges(self, running: int, receiving: int) -> None:
        self.running.set(running)
        self.receiving.set(receiving)


def access_record(*, request_id: str, route: str, status: int, tenant: str, model: str, done: Optional[dict],
                  ttft_s: Optional[float], total_s: float, stream: bool, outcome: Optional[str] = None,
                  error: Optional[str] = None) -> dict[str, Any]:
    done = done or {}
    u = done.get("usage") or {}
    sim = done.get("retrieved_sim")
    return {
        "request_id": request_id, "route": route, "status": status,
        "outcome": outcome or outcome_of(done or None), "tenant": tenant, "model": model,
        "replica": done.get("replica"), "cache_hit": bool(done.get("cache_hit", False)),
        "similarity": round(float(sim), 4) if isinstance(sim, (int, float)) else None,
        "prompt_tokens": u.get("prompt_tokens"), "reused_tokens": u.get("reused_tokens"),
        "completion_tokens": u.get("completion_tokens"),
        "ttft_s": round(ttft_s, 4) if ttft_s is not None else None, "total_s": round(total_s, 4),
        "finish_reason": done.get("finish_reason"), "fallback": done.get("fallback"), "stream": stream,
        "error": error,
    }


def format_access(rec: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"event": "access", **rec}, separators=(",", ":"), default=str)
    parts = []
    for k in ACCESS_FIELDS:
        v = rec.get(k)
        if v is None:
            continue
        v = str(v).lower() if isinstance(v, bool) else str(v)
        parts.append(f"{k}={json.dumps(v) if (' ' in v or '=' in v or not v) else v}")
    return "access " + " ".join(parts)


def log_access(rec: dict, logger: Optional[logging.Logger] = None) -> None:
    """One line per request through ``ray.serve``'s logger (the Ingress replica's log file).

    Text encoding: ``access key=value ...``. With ``log_format: json`` the deployments use
    Serve's JSON encoding and the record carries the fields as a ``semshare_access`` object."""
    (logger or logging.getLogger("ray.serve")).info(format_access(rec, "text"), extra={"semshare_access": rec})


def serve_logging_config(fmt: str) -> Optional[dict]:
    """Serve's per-deployment ``logging_config`` for ``log_format`` (None: Serve's default)."""
    if fmt == "json":
        return {"encoding": "JSON"}
    return None
