"""The typed protocol between the ingress and the model replicas.

The ingress validates HTTP bodies (:mod:`serve_app.schemas`, where the sampling
defaults live), resolves the tenant, and then prepares a :class:`ReplicaRequest`
(:mod:`serve_app.front`): the prompt is tokenized and fingerprinted and the index is
looked up ONCE, before routing, so the request router can send it to the replica that
holds the reference's hot copy (:mod:`serve_app.affinity_router`). The replica never
repeats that work; it only checks the request (:meth:`ReplicaRequest.check`).

Patterns for tenants and store keys are defined here, once.

Events the replica streams back are plain dicts (cheap to ship, easy to forward as
SSE) whose shapes are the ``TypedDict``s below; build them with :func:`error_event`,
:func:`token_event` and :func:`done_event`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypedDict

import numpy as np

# an index namespace: a tenant name, or a tenant's cache_salt namespace (ingress.salted_tenant)
TENANT_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}(?:\.salt-[0-9a-f]{20})?$"
KEY_PATTERN = r"^[A-Za-z0-9_.\-:/]{1,128}$"
TENANT_RE = NAMESPACE_RE = re.compile(TENANT_PATTERN)
KEY_RE = re.compile(KEY_PATTERN)
MIN_TEMPERATURE = 1e-3  # below: greedy (logits / 5e-324 overflow the softmax)


class ClientError(Exception):
    """The client's mistake: becomes a 4xx (an ``error`` event on the replica side)."""

    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.error_type = status, error_type


def internal_key(tenant: str, key: str) -> str:
    """Index keys are namespaced per tenant: a tenant can never overwrite another's entry."""
    return f"{tenant}:{key}"


def public_key(internal: str) -> str:
    return internal.split(":", 1)[1] if ":" in internal else internal


@dataclass(frozen=True)
class Sampling:
    """Decode parameters, fully specified (the defaults are the HTTP schemas' business)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True

    def normalized(self) -> "Sampling":
        t = 0.0 if self.temperature < MIN_TEMPERATURE else float(self.temperature)
        return Sampling(int(self.max_new_tokens), t, min(1.0, max(float(self.top_p), 1e-6)), self.seed,
                        tuple(s for s in self.stop if isinstance(s, str) and s), bool(self.stop_on_eos))


@dataclass
class Reference:
    """The index entry a request may reuse (from :meth:`serve_app.index_actor.KVIndex.lookup`)."""

    key: str                 # internal key (tenant:key)
    uid: str                 # version of the entry's KV: the hot-tier key
    similarity: float
    ref_token_count: int
    depth: int = 0           # derivation depth: 0 = from a full prefill
    exact: bool = True       # KV exactly a full prefill's (replayable when identical)
    hot: list[str] = field(default_factory=list)  # replicas holding a hot copy
    refs: list = field(default_factory=list)       # [ObjectRef(PackedKV)], nested on purpose


@dataclass
class ReplicaRequest:
    """One generation, as the ingress hands it to a replica.

    ``ids``/``vector`` are set when the ingress tokenized (the normal case); when it
    could not (no tokenizer on the ingress's node), ``prompt``/``messages`` are set
    instead and the replica tokenizes, fingerprints and looks up itself.
    """

    tenant: str
    sampling: Sampling
    use_semshare: bool = True
    sim_threshold: Optional[float] = None
    store_key: Optional[str] = None
    ids: Optional[np.ndarray] = None
    vector: Optional[np.ndarray] = None
    tokenizer_digest: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    looked_up: bool = False               # the ingress ran the lookup (reference may still be None)
    reference: Optional[Reference] = None
    more_sources: list[Reference] = field(default_factory=list)  # other entries covering other parts of the prompt
    lookup_fallback: Optional[str] = None  # e.g. index_unavailable
    index_namespace: Optional[str] = None  # where the index actor lives (the router reports dead replicas there)
    lookup_ms: float = 0.0
    prepare_ms: float = 0.0
    # False when the caller reads only the first event and the final ``done`` (a
    # non-streaming response): the replica then sends the first token and the ``done``
    # event, not one event per token (fewer Ray stream items and event-loop wake-ups)
    stream: bool = True

    @property
    def sources(self) -> list[Reference]:
        """Every entry the prompt may reuse, best first."""
        return ([self.reference] if self.reference is not None else []) + list(self.more_sources or [])

    @property
    def hot_replicas(self) -> list[str]:
        """Read by the request router (cache affinity): the replicas holding the best
        source hot (with one source: the replicas holding it); among them, or when no
        replica holds the best one, those holding the most other sources."""
        srcs = self.sources
        if not srcs:
            return []
        primary = set(srcs[0].hot)
        held: dict[str, int] = {}
        for r in srcs[1:]:
            for rep in r.hot:
                held[rep] = held.get(rep, 0) + 1
        pool = primary or set(held)
        if not pool:
            return []
        best = max(held.get(rep, 0) for rep in pool)
        return sorted(rep for rep in pool if held.get(rep, 0) == best)

    def check(self, max_prompt_tokens: int, vocab_size: int) -> None:
        """Defensive checks on the replica (the ingress already validated): ClientError."""
        if not isinstance(self.tenant, str) or not TENANT_RE.match(self.tenant):
            raise ClientError("invalid tenant name")
        if self.store_key is not None and not KEY_RE.match(str(self.store_key)):
            raise ClientError("store_key must match [A-Za-z0-9_.-:/]{1,128}")
        if self.ids is not None:
            ids = self.ids
            if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int64:
                raise ClientError("token ids must be a 1-d int64 array", 500, "internal_error")
            if ids.size == 0:
                raise ClientError("prompt is empty (no tokens)")
            if ids.size > max_prompt_tokens:
                raise ClientError(f"prompt has {ids.size} tokens; this server accepts at most "
                                  f"{max_prompt_tokens}", error_type="context_length_exceeded")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ClientError("token ids outside the vocabulary", 500, "internal_error")
        elif self.prompt is None and self.messages is None:
            raise ClientError("no prompt")
        if self.sampling.max_new_tokens < 1:
            raise ClientError("max_new_tokens must be >= 1")


# events --------------------------------------------------------------------------------


class ErrorEvent(TypedDict):
    type: Literal["error"]
    status: int
    message: str
    error_type: str


class TokenEvent(TypedDict, total=False):
    type: Literal["token"]
    id: Optional[int]  # the last token of the event
    ids: list[int]     # every token of the event (several when the client reads slower than the model)
    text: str
    replica: str  # first token only


class DoneEvent(TypedDict):
    type: Literal["done"]
    text: str
    finish_reason: str
    replica: str
    model: str
    used_semshare: bool
    cache_hit: bool
    cache_tier: Optional[str]  # "hot" (replica-local), "cold" (object store), None (no hit)
    ref_key: Optional[str]
    ref_depth: Optional[int]
    retrieved_sim: Optional[float]
    store_key: Optional[str]
    depth: Optional[int]       # derivation depth of the registered entry
    fallback: Optional[str]
    usage: dict
    timing: dict


def error_event(e: ClientError) -> ErrorEvent:
    return {"type": "error", "status": e.status, "message": str(e), "error_type": e.error_type}


def token_event(tok: Optional[int], text: str, replica: Optional[str] = None,
                ids: Optional[list[int]] = None) -> TokenEvent:
    ev: TokenEvent = {"type": "token", "id": tok, "text": text}
    if ids is not None:
        ev["ids"] = list(ids)
    if replica is not None:
        ev["replica"] = replica
    return ev


def done_event(**fields: Any) -> DoneEvent:
    missing = set(DoneEvent.__annotations__) - set(fields) - {"type"}
    if missing:
        raise TypeError(f"done event misses {sorted(missing)}")
    return {"type": "done", **fields}  # type: ignore[return-value]
