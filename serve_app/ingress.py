"""HTTP ingress (FastAPI on ``@serve.ingress``): native and OpenAI-compatible routes.

The ingress owns the HTTP contract: validation (pydantic models in
:mod:`serve_app.schemas`, configured caps), tenant resolution, OpenAI-style error
bodies ``{"error": {"message", "type", ...}}`` and SSE streaming. Generation runs on
the ``LLMServer`` replicas through a streaming deployment handle.

Tenants and keys (:mod:`serve_app.auth`): with API keys configured every route but
health needs ``Authorization: Bearer <key>`` (401 JSON + ``WWW-Authenticate``) and the
tenant is the key's; without keys ``X-Tenant`` picks it (default ``default``). Lookups,
stats and clear only see the caller's tenant; admin keys see / clear all.

An ASGI guard in front of the routes enforces, in order: header count / size limits
(431), authentication, the body limit on the bytes actually received (chunked bodies
too) under a body-read deadline (408) with a bounded pool of requests still receiving
(503), and an admission limit on generation requests whose body has arrived
(``max_concurrent_requests``: 503 JSON + ``Retry-After``); see :mod:`serve_app.http_edge`.
Each generation runs under ``request_timeout_s`` (504 JSON, or an SSE error event and
``[DONE]`` once the stream has started). The guard also writes one access-log line and
the Prometheus metrics per generation request (:mod:`serve_app.observability`); a client
that hangs up is logged as cancelled. Fault counters are in the admin stats.
"""
import asyncio
import hashlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from semshare_core.namespaces import SALT_SEPARATOR, quota_owner

from .auth import TENANT_RE, AuthConfigError, KeyRing, Principal, open_mode_principal
from .front import Front
from .http_edge import BodyReader, header_problem, replay
from .observability import IngressMetrics, access_record, log_access, outcome_of
from .protocol import NAMESPACE_RE, ClientError
from .schemas import (ChatCompletionRequest, ClearRequest, CompletionRequest, GenerateRequest, GenerateResponse,
                      error_body)
from .settings import AppArgs

_TIMEOUT = getattr(asyncio, "timeout", None)  # 3.11+: a deadline without a Task per awaited event

logger = logging.getLogger("ray.serve")

app = FastAPI(title="semshare-serve", version="0.1.0",
              description="Semantic KV-cache reuse (SemShareKV) on Ray Serve")
HEALTH_PATHS = frozenset({"/health", "/v1/health", "/ready", "/v1/ready"})
GENERATION_PATHS = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Any = None,
                 code: Any = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type_, self.param = status, message, type_, param
        self.code, self.headers = code, headers


def _err(status: int, message: str, type_: str = "invalid_request_error", param: Any = None, code: Any = None,
         headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return _err(exc.status, exc.message, exc.type_, exc.param, exc.code, exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
        return _err(400, f"malformed JSON body: {detail}")
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("model_attributes_type", "dict_type",
                                                                      "missing") for e in errors):
        return _err(400, "the request body must be a JSON object (malformed JSON, wrong Content-Type, "
                         "or no body)")
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return _err(422, "; ".join(parts) or "invalid request", param=param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _err(exc.status_code, str(exc.detail), type_)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s", request.url.path)
    return _err(500, "internal server error", "internal_error")


def _new_counters() -> dict:
    return {"requests": 0, "auth_failures": 0, "forbidden": 0, "body_too_large": 0, "overloaded": 0,
            "timeouts": 0, "replica_failures": 0, "stream_errors": 0, "internal_errors": 0, "headers_too_large": 0,
            "cancelled": 0, "fallbacks": {}}


class Guard:
    """Per-replica request guard: header limits, auth, body (limit, deadline, receiving pool),
    admission, access log + metrics. Set up by ``Ingress.__init__``."""

    def __init__(self, args: AppArgs, keys: KeyRing, metrics: Optional[IngressMetrics] = None):
        self.args, self.keys, self.metrics = args, keys, metrics
        self.counters = _new_counters()
        self.inflight = 0
        self.body = BodyReader(args.max_receiving_requests, args.body_timeout_s)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.gauges(self.inflight, self.body.receiving)

    def retry_headers(self) -> dict:
        return {"Retry-After": str(self.args.retry_after_s)}

    async def __call__(self, app_, scope, receive, send):
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        problem = header_problem(scope.get("headers") or [], self.args.max_header_bytes, self.args.max_header_count)
        if problem:
            self.counters["headers_too_large"] += 1
            return await _err(431, problem, code="headers_too_large")(scope, receive, send)
        if path in HEALTH_PATHS:
            return await app_(scope, receive, send)
        self.counters["requests"] += 1
        headers = Headers(scope=scope)
        # 1. who is calling
        if self.keys.enabled:
            principal = self.keys.authenticate(headers.get("authorization"))
            if principal is None:
                self.counters["auth_failures"] += 1
                resp = _err(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                            "authentication_error", code="invalid_api_key",
                            headers={"WWW-Authenticate": 'Bearer realm="semshare"'})
                return await resp(scope, receive, send)
        else:
            try:
                principal = open_mode_principal(headers, self.args.trust_tenant_header)
            except ValueError as e:
                return await _err(400, str(e), param="X-Tenant")(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        # 2. the body, as received (Content-Length may be absent or lie: chunked bodies)
        limit = self.args.max_body_bytes
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return await _err(400, "bad Content-Length header")(scope, receive, send)
                if int(length) > limit:
                    self.counters["body_too_large"] += 1
                    return await _err(413, f"request body over {limit} bytes", code="body_too_large")(
                        scope, receive, send)
            # a slow body holds a receiving slot (bounded), not an admission slot
            self._gauges()
            out = await self.body.read(receive, limit)
            self._gauges()
            if out.cancelled:
                self.counters["cancelled"] += 1
                return None  # nobody to answer; logged as cancelled by the reader
            if out.status:
                if out.status == 413:
                    self.counters["body_too_large"] += 1
                elif out.status == 503:
                    self.counters["overloaded"] += 1
                else:
                    self.counters["timeouts"] += 1
                type_ = {408: "timeout", 503: "overloaded"}.get(out.status, "invalid_request_error")
                hdrs = {**self.retry_headers(), "Connection": "close"} if out.status == 503 else {"Connection": "close"}
                return await _err(out.status, out.message, type_, code=out.code, headers=hdrs)(scope, receive, send)
            receive = replay(out.body, receive)
        # 3. admission (generation only; stats / models stay cheap and always answer)
        if path in GENERATION_PATHS:
            if self.inflight >= self.args.max_concurrent_requests:
                self.counters["overloaded"] += 1
                resp = _err(503, f"server busy ({self.inflight} requests in flight), retry later", "overloaded",
                            code="too_many_requests", headers=self.retry_headers())
                return await resp(scope, receive, send)
            self.inflight += 1
            self._gauges()
            try:
                return await self._observed(app_, path, principal, scope, receive, send)
            finally:
                self.inflight -= 1
                self._gauges()
        return await app_(scope, receive, send)

    async def _observed(self, app_, path: str, principal: Principal, scope, receive, send):
        """Run a generation route; then one access line + the metrics (status seen on ``send``)."""
        info = {"t0": time.perf_counter(), "done": None, "ttft_s": None, "stream": False,
                "tenant": principal.tenant, "request_id": uuid.uuid4().hex[:16]}
        scope["state"]["semshare"] = info
        status = {"code": None}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        async def receive_():
            msg = await receive()
            if msg.get("type") == "http.disconnect":  # Starlette's streaming response listens for it
                info["disconnected"] = True
            return msg

        outcome, error = None, None
        try:
            return await app_(scope, receive_, send_)
        except asyncio.CancelledError:  # the client hung up (Serve cancels the request)
            outcome = "cancelled"
            self.counters["cancelled"] += 1
            raise
        except ClientDisconnect:  # a send after the client left (ASGI spec >= 2.4 streams: OSError on send)
            outcome = "cancelled"
            self.counters["cancelled"] += 1
            return None  # nobody to answer
        except Exception as e:
            error = type(e).__name__
            raise
        finally:
            code = status["code"] or (499 if outcome == "cancelled" else 500)
            done = info["done"]
            if outcome is None and done is None and info.get("disconnected"):
                # a stream cut mid-way: the response ended because the client left, not on an error
                # (anything the stream reported in-band after the hang-up is a consequence of it)
                outcome = "cancelled"
                self.counters["cancelled"] += 1
            if outcome is None:
                outcome = info.get("outcome") or (outcome_of(done) if done is not None and code < 400 else "error")
            if outcome == "cancelled":
                logger.info("request %s on %s cancelled: the client disconnected", info["request_id"], path)
            try:
                if self.metrics is not None:
                    self.metrics.finished(path, code, outcome, done, info["ttft_s"])
                if self.args.access_log:
                    log_access(access_record(
                        request_id=info["request_id"], route=path, status=code, tenant=info["tenant"],
                        model=self.args.served_model_name(), done=done, ttft_s=info["ttft_s"],
                        total_s=time.perf_counter() - info["t0"], stream=info["stream"], outcome=outcome,
                        error=error or info.get("error")), logger)
            except Exception:  # noqa: BLE001 - observability never fails a request
                logger.exception("access log / metrics failed")


_GUARD: dict[str, Optional[Guard]] = {"guard": None}


def _install_guard(guard: Guard) -> None:
    """Called by ``Ingress.__init__``. Serve pickles the deployment class BY VALUE (with a
    copy of the globals it uses), so the class must not assign module globals itself: this
    module-level function is pickled by reference and updates the real module's state, the
    one the middleware (also by reference) reads."""
    _GUARD["guard"] = guard


class _GuardMiddleware:
    def __init__(self, app_):
        self.app = app_

    async def __call__(self, scope, receive, send):
        guard = _GUARD["guard"]
        if scope["type"] != "http" or guard is None:
            return await self.app(scope, receive, send)
        return await guard(self.app, scope, receive, send)


app.add_middleware(_GuardMiddleware)


def _principal(request: Request) -> Principal:
    p = getattr(request.state, "principal", None)
    return p if isinstance(p, Principal) else Principal("default")


def _request_info(request: Request) -> dict:
    """The guard's per-request record (access log / metrics); a dummy outside generation routes."""
    info = getattr(request.state, "semshare", None)
    return info if isinstance(info, dict) else {}


def salted_tenant(tenant: str, salt: Optional[str]) -> str:
    """The index namespace for ``tenant`` + ``cache_salt``: requests share cached KV only with
    the same tenant AND salt: ``<tenant>.salt-<20 hex of a hash of both>``, so no salt can
    reach another tenant's entries or the unsalted ones. The tenant is kept whole: the index
    counts a salted namespace against that tenant's quota
    (:func:`semshare_core.index.quota_owner`), so a salt flood only evicts the flooder's own
    entries. Tenant names never contain ``.salt-`` (:data:`serve_app.auth.TENANT_RE`)."""
    if salt is None:
        return tenant
    digest = hashlib.sha256(f"{tenant}\0{salt}".encode("utf-8")).hexdigest()[:20]
    name = f"{tenant}{SALT_SEPARATOR}{digest}"  # <= 64 + 26 chars (protocol.TENANT_PATTERN)
    assert NAMESPACE_RE.match(name) and quota_owner(name) == tenant
    return name


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, llm: DeploymentHandle, args: dict):
        self.args = AppArgs(**args)
        self.llm = llm
        self.model_name = self.args.served_model_name()
        self.default_threshold = self.args.semshare_config().sim_threshold
        self.created = int(time.time())
        # tokenize + fingerprint + look up once, here, before routing (serve_app/front.py)
        self.front = Front(self.args, signature_fn=self._model_signature)
        try:
            keys = KeyRing.from_args(self.args)
        except AuthConfigError as e:  # fail the deployment, loudly, rather than serve without keys
            raise RuntimeError(f"API key configuration: {e}") from None
        self.metrics = IngressMetrics(self.model_name)
        self.guard = Guard(self.args, keys, self.metrics)
        self.counters = self.guard.counters
        self._ready_lock = asyncio.Lock()
        self._index_recreate: Optional[asyncio.Task] = None
        _install_guard(self.guard)
        logger.info("Ingress: %s", f"{len(keys)} API key(s), keyed mode" if keys.enabled
                    else "no API keys: open mode (X-Tenant header)")

    # helpers -----------------------------------------------------------------------
    def _tenant(self, request: Request, salt: Optional[str] = None) -> str:
        """The index namespace of the request: the caller's tenant, or a salted one inside it."""
        if salt is not None and not self.args.allow_cache_salt:
            raise APIError(400, "cache_salt is not accepted by this server (allow_cache_salt is off)",
                           param="cache_salt", code="cache_salt_unsupported")
        return salted_tenant(_principal(request).tenant, salt)

    def _count_fallback(self, done: dict) -> None:
        reason = done.get("fallback")
        if reason:
            fb = self.counters["fallbacks"]
            fb[reason] = fb.get(reason, 0) + 1

    def _check_max_new(self, n: int, param: str) -> None:
        if n > self.args.max_new_tokens:
            raise APIError(400, f"{param}={n} is over this server's cap of {self.args.max_new_tokens}", param=param)

    def _check_prompt_chars(self, text: str) -> None:
        # cheap pre-check before tokenising: no tokenizer makes tokens of < 1 char... mostly;
        # 16 chars per token is far beyond any real tokenizer's average.
        if len(text) > self.args.max_prompt_tokens * 16:
            raise APIError(400, f"prompt is far over the {self.args.max_prompt_tokens}-token limit",
                           type_="context_length_exceeded", param="prompt")

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists {self.model_name!r}",
                           type_="not_found_error", param="model")

    async def _model_signature(self) -> str:
        return await self.llm.model_signature.remote()

    async def _index(self):
        return await self.front.index.handle()

    async def _call_index(self, method: str, *args):
        import asyncio

        try:
            handle = await self._index()
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self.args.lookup_timeout_s * 5)
        except (asyncio.TimeoutError, RayActorError) as e:
            self.front.index.reset()
            raise APIError(503, f"the cache index is unavailable ({type(e).__name__}); retry shortly",
                           type_="service_unavailable", headers=self.guard.retry_headers()) from e

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.args.request_timeout_s

    async def _next(self, gen, deadline: float) -> dict:
        """The next event before ``deadline``; failures become :class:`APIError`s (gen cancelled)."""
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            if _TIMEOUT is None:  # Python 3.10
                return await asyncio.wait_for(gen.__anext__(), remaining)
            async with _TIMEOUT(remaining):  # no Task per event (wait_for makes one per token)
                return await gen.__anext__()
        except StopAsyncIteration:
            raise
        except asyncio.TimeoutError:
            gen.cancel()
            self.counters["timeouts"] += 1
            raise APIError(504, f"request ran past the {self.args.request_timeout_s:g}s limit", "timeout",
                           code="request_timeout") from None
        except BackPressureError as e:
            self.counters["overloaded"] += 1
            raise APIError(503, f"server overloaded, retry later ({e})", type_="overloaded", code="queue_full",
                           headers=self.guard.retry_headers()) from e
        except RayTaskError as e:  # the replica raised: a bug, not the client's fault
            gen.cancel()
            self.counters["internal_errors"] += 1
            logger.error("replica error: %s", e)
            raise APIError(500, "generation failed on the model replica", type_="internal_error") from e
        except (RayActorError, RayError) as e:  # the replica died / became unreachable
            gen.cancel()
            self.counters["replica_failures"] += 1
            raise APIError(503, f"model replica unavailable ({type(e).__name__}); retry",
                           type_="service_unavailable", code="replica_failed",
                           headers=self.guard.retry_headers()) from e

    async def _start(self, payload: dict, deadline: float):
        """Start generation; return ``(response_generator, first_event)`` or raise APIError."""
        try:
            req = await self.front.prepare(payload)
        except ClientError as e:
            raise APIError(e.status, str(e), e.error_type, param="prompt") from None
        for attempt in range(3):  # a replica that died before its first event: nothing was sent, retry
            try:
                gen = self.llm.options(stream=True).generate.remote(req)
            except BackPressureError as e:
                self.counters["overloaded"] += 1
                raise APIError(503, f"server overloaded, retry later ({e})", type_="overloaded", code="queue_full",
                               headers=self.guard.retry_headers()) from e
            try:
                first = await self._next(gen, deadline)
                break
            except StopAsyncIteration as e:
                raise APIError(500, "generation produced no events", type_="internal_error") from e
            except APIError as e:
                if e.code != "replica_failed" or attempt == 2:
                    raise
                self.counters["replica_retries"] = self.counters.get("replica_retries", 0) + 1
                logger.warning("replica failed before the first event (%s): retrying on another", e.message)
        if first.get("type") == "error":
            status = first.get("status", 400)
            if status == 503:  # the replica's scheduler is full: retry shortly
                self.counters["overloaded"] += 1
                raise APIError(503, first.get("message", "server overloaded"), first.get("error_type", "overloaded"),
                               code="queue_full", headers=self.guard.retry_headers())
            raise APIError(status, first.get("message", "bad request"),
                           first.get("error_type", "invalid_request_error"), param="prompt")
        return gen, first

    async def _events(self, gen, first, deadline: float) -> AsyncIterator[dict]:
        yield first
        while True:
            try:
                ev = await self._next(gen, deadline)
            except StopAsyncIteration:
                return
            if ev.get("type") == "done":
                self._count_fallback(ev)
            yield ev

    async def _collect(self, gen, first, deadline) -> dict:
        """Drain a non-streaming generation; returns its final ``done`` event."""
        done = None
        try:
            async for ev in self._events(gen, first, deadline):
                if ev["type"] == "done":
                    done = ev
        finally:
            gen.cancel()
        if done is None:
            raise APIError(500, "generation ended without a result", type_="internal_error")
        return done

    # native --------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request):
        t0 = time.perf_counter()
        self._check_max_new(body.max_new_tokens, "max_new_tokens")
        self._check_prompt_chars(body.prompt)
        payload = {**body.model_dump(exclude={"cache_salt", "stop"}), "tenant": self._tenant(request, body.cache_salt),
                   "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or []), "stream": False}
        deadline = self._deadline()
        info = _request_info(request)
        gen, first = await self._start(payload, deadline)
        ttft = (time.perf_counter() - t0) * 1e3
        info["ttft_s"] = ttft / 1e3
        done = await self._collect(gen, first, deadline)
        info["done"] = done
        rt = done["timing"]
        usage = dict(done["usage"])
        if isinstance(done.get("mapping"), dict):  # exact vs approximate split, when the replica reports it
            usage["mapping"] = done["mapping"]
        return {**{k: done[k] for k in ("text", "used_semshare", "cache_hit", "ref_key", "retrieved_sim",
                                         "store_key", "replica", "finish_reason", "fallback")},
                **{k: done.get(k) for k in ("cache_tier", "depth", "ref_depth")},
                "usage": usage,
                "timing": {"ttft_ms": round(ttft, 3), "total_ms": round((time.perf_counter() - t0) * 1e3, 3),
                           "lookup_ms": rt["lookup_ms"], "kv_fetch_ms": rt["kv_fetch_ms"],
                           "prefill_ms": rt["prefill_ms"], "kv_check_ms": rt.get("kv_check_ms", 0.0),
                           "register_wait_ms": rt.get("register_wait_ms", 0.0)}}

    @app.get("/v1/cache/stats")
    async def cache_stats(self, request: Request, cache_salt: Optional[str] = None):
        """The caller's tenant: entries, bytes, hits, misses, quotas. Admins: everything.
        ``?cache_salt=...``: that salt's namespace inside the caller's tenant."""
        p = _principal(request)
        if cache_salt is not None:
            if not cache_salt or len(cache_salt) > 256:
                raise APIError(422, "cache_salt must be 1-256 characters", param="cache_salt")
            p = Principal(self._tenant(request, cache_salt), False, p.authenticated)
        if p.admin:
            stats = await self._call_index("stats", None)
            stats["caller_tenant"] = p.tenant
            stats["admin"] = True
            stats["ingress"] = json.loads(json.dumps(self.counters))
            stats["ingress"]["inflight"] = self.guard.inflight
            stats["ingress"]["receiving"] = self.guard.body.receiving
            stats["ingress"]["edge"] = dict(self.guard.body.counters)
            stats["ingress"]["tokens"] = dict(self.metrics.totals)
            stats["default_sim_threshold"] = self.default_threshold
            return stats
        full = await self._call_index("stats", p.tenant)
        mine = full.get("tenant_stats") or {}
        return {"tenant": p.tenant, "caller_tenant": p.tenant, "admin": False,
                "entries": mine.get("entries", 0), "bytes": mine.get("bytes", 0),
                "hits": mine.get("hits", 0), "misses": mine.get("misses", 0),
                "tenant_max_items": self.args.tenant_max_items, "tenant_max_bytes": self.args.tenant_max_bytes,
                "default_sim_threshold": self.default_threshold}

    @app.post("/v1/cache/clear")
    async def cache_clear(self, request: Request, body: Optional[ClearRequest] = None):
        """Clear the caller's tenant; an admin may clear another tenant or all of them."""
        p = _principal(request)
        target: Optional[str] = p.tenant
        if body is not None and body.cache_salt is not None:
            if body.all_tenants or body.tenant is not None:
                raise APIError(400, "cache_salt clears a namespace of the caller's own tenant; it cannot be "
                               "combined with tenant / all_tenants", param="cache_salt")
            target = self._tenant(request, body.cache_salt)
        elif body is not None and (body.all_tenants or (body.tenant is not None and body.tenant != p.tenant)):
            if not p.admin:
                self.counters["forbidden"] += 1
                raise APIError(403, "only an admin key may clear other tenants", "permission_error",
                               param="all_tenants" if body.all_tenants else "tenant")
            target = None if body.all_tenants else body.tenant
        removed = await self._call_index("clear", target)
        return {"cleared": removed, "tenant": target or "*"}

    @app.get("/health")
    @app.get("/v1/health")
    async def health(self):
        """Liveness: this ingress replica's event loop answers. No remote call."""
        return {"status": "ok", "model": self.model_name}

    @app.get("/ready")
    @app.get("/v1/ready")
    async def ready(self):
        """Readiness: 200 only when Serve reports a running model replica AND the index actor
        answers a ping within ``ready_timeout_s``; else 503 JSON with the reason."""
        async with self._ready_lock:  # a burst of probes makes one check at a time
            checks = {"model": await self._model_ready(), "index": await self._index_ready()}
        bad = {k: v for k, v in checks.items() if v is not True}
        if bad:
            reason = "; ".join(f"{k}: {v}" for k, v in bad.items())
            return JSONResponse({"status": "not_ready", "reason": reason, "checks": {k: v is True or v
                                                                                    for k, v in checks.items()},
                                 **error_body(f"not ready: {reason}", "service_unavailable", code="not_ready")},
                                status_code=503, headers=self.guard.retry_headers())
        return {"status": "ready", "model": self.model_name, "checks": {k: True for k in checks}}

    async def _model_ready(self):
        """True, or why not: Serve's controller view of the model deployment (it health-checks
        every replica with ``check_health``), so a busy replica still counts as ready.

        A replica warming up (``warmup``) is not counted: it warms up inside its
        constructor, and Serve marks a replica RUNNING (and routes requests to it) only
        once ``initialize_and_get_metadata``, which runs the constructor, has returned."""
        try:
            ctx = serve.get_replica_context()
            name = getattr(self.llm, "deployment_name", None) or "SemShareServer"
            st = await asyncio.wait_for(asyncio.to_thread(serve.status), self.args.ready_timeout_s * 2)
            dep = st.applications[ctx.app_name].deployments.get(name)
            if dep is None:
                return f"deployment {name} not found"
            running = int(dep.replica_states.get("RUNNING", 0))
            if running < 1:
                return f"no running replica ({dep.status}: {dict(dep.replica_states)})"
            return True
        except asyncio.TimeoutError:
            return "the Serve controller did not answer"
        except Exception as e:  # noqa: BLE001
            return f"status unavailable ({type(e).__name__})"

    async def _index_ready(self):
        """True, or why not. A missing actor is re-created in the background (as replicas do on
        their next lookup), so readiness returns once it is up."""
        import ray

        a = self.args
        try:  # the per-model default namespace asks a replica for the model signature once
            namespace = await asyncio.wait_for(self.front.index.namespace(), a.ready_timeout_s * 2)
        except Exception as e:  # noqa: BLE001 - no replica yet
            return f"index namespace unknown: no model signature yet ({type(e).__name__})"
        try:
            handle = await asyncio.to_thread(ray.get_actor, a.index_name, namespace=namespace)
        except ValueError:
            if self._index_recreate is None or self._index_recreate.done():
                self.front.index.reset()
                self._index_recreate = asyncio.get_running_loop().create_task(self._index())
            return "index actor not found (re-creating it)"
        try:
            await asyncio.wait_for(handle.ping.remote(), a.ready_timeout_s)
            return True
        except asyncio.TimeoutError:
            return f"index actor did not answer within {a.ready_timeout_s:g}s"
        except Exception as e:  # noqa: BLE001 - dead / restarting
            return f"index actor unavailable ({type(e).__name__})"

    # OpenAI-compatible ---------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "semshare-serve"}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        if model_id != self.model_name:
            raise APIError(404, f"model {model_id!r} is not served here; GET /v1/models lists {self.model_name!r}",
                           type_="not_found_error", param="model", code="model_not_found")
        return self._model_card()

    def _openai_payload(self, body, request: Request) -> dict:
        self._check_model(body.model)
        max_new = body.max_completion_tokens or body.max_tokens or (16 if isinstance(body, CompletionRequest)
                                                                   else self.args.max_new_tokens)
        max_new = min(max_new, self.args.max_new_tokens) if not (body.max_tokens or body.max_completion_tokens) \
            else max_new
        self._check_max_new(max_new, "max_tokens")
        return {"max_new_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p,
                "seed": body.seed, "use_semshare": body.use_semshare, "sim_threshold": body.sim_threshold,
                "tenant": self._tenant(request, body.cache_salt)}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "this server takes exactly one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        self._check_prompt_chars(prompt)
        payload = {**self._openai_payload(body, request), "prompt": prompt}
        return await self._openai(body, payload, "text_completion", request,
                                  echo_prefix=prompt if body.echo else "")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self._check_prompt_chars("".join(m["content"] for m in messages))
        payload = {**self._openai_payload(body, request), "messages": messages}
        return await self._openai(body, payload, "chat.completion", request)

    async def _openai(self, body, payload: dict, kind: str, request: Request, echo_prefix: str = ""):
        payload["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        payload["stream"] = bool(body.stream)
        created, rid = int(time.time()), ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        deadline = self._deadline()
        info = _request_info(request)
        info["stream"] = bool(body.stream)
        t0 = time.perf_counter()
        gen, first = await self._start(payload, deadline)
        info["ttft_s"] = time.perf_counter() - t0
        replica_hdr = {"X-SemShare-Replica": str(first.get("replica", ""))}

        def usage(done: dict) -> dict:
            u = done["usage"]
            return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                    "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                    "prompt_tokens_details": {"cached_tokens": u["reused_tokens"]}}

        def semshare(done: dict) -> dict:
            return {k: done.get(k) for k in ("cache_hit", "cache_tier", "ref_key", "retrieved_sim", "store_key",
                                             "replica", "used_semshare", "fallback", "depth")}

        if not body.stream:
            done = await self._collect(gen, first, deadline)
            info["done"] = done
            text = echo_prefix + done["text"]
            finish = done["finish_reason"]
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                       "logprobs": None} if kind == "chat.completion"
                      else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice],
                    "usage": usage(done), "semshare": semshare(done)}

        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta_text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
            if kind == "chat.completion":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            c = {"id": rid, "object": chunk_kind, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                c["usage"] = None
            return c

        async def stream():
            try:
                if kind == "chat.completion":
                    yield _sse(chunk("", role=True))
                if echo_prefix:
                    yield _sse(chunk(echo_prefix))
                done = None
                async for ev in self._events(gen, first, deadline):
                    if ev["type"] == "token" and ev["text"]:
                        yield _sse(chunk(ev["text"]))
                    elif ev["type"] == "done":
                        done = ev
                if done is None:
                    raise RuntimeError("generation ended without a result")
                info["done"] = done
                final = chunk(None if kind == "chat.completion" else "", done["finish_reason"])
                final["semshare"] = semshare(done)
                yield _sse(final)
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_kind, "created": created, "model": self.model_name,
                                "choices": [], "usage": usage(done)})
            except APIError as e:  # headers are sent: report in-band, then end the stream cleanly
                info["outcome"], info["error"] = "error", e.type_
                self.counters["stream_errors"] += 1
                logger.warning("stream %s ended early: %s", rid, e.message)
                yield _sse(error_body(e.message, e.type_, code=e.code))
            except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
                info["outcome"], info["error"] = "error", type(e).__name__
                self.counters["stream_errors"] += 1
                logger.exception("stream %s failed", rid)
                yield _sse(error_body(f"generation failed: {type(e).__name__}", "internal_error"))
            finally:
                gen.cancel()  # client gone or finished: stop decoding on the replica
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **replica_hdr})
