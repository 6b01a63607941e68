"""HTTP ingress (FastAPI on ``@serve.ingress``): native and OpenAI-compatible routes.

The ingress owns the HTTP contract: validation (pydantic models in
:mod:`serve_app.schemas`, configured caps), tenant resolution, OpenAI-style error
bodies ``{"error": {"message", "type", ...}}`` and SSE streaming. Generation runs on
the ``LLMServer`` replicas through a streaming deployment handle.

Tenants: a ``Authorization: Bearer <key>`` header maps to a tenant derived from a hash
of the key; else ``X-SemShare-Tenant`` (when ``trust_tenant_header``, i.e. behind a
proxy that sets it); else ``default``. Lookups only see the caller's tenant.
"""
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
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .index_actor import get_or_create_index_actor
from .llm_server import TENANT_RE
from .schemas import (ChatCompletionRequest, ClearRequest, CompletionRequest, GenerateRequest, GenerateResponse,
                      error_body)
from .settings import AppArgs

logger = logging.getLogger("ray.serve")

app = FastAPI(title="semshare-serve", version="0.1.0",
              description="Semantic KV-cache reuse (SemShareKV) on Ray Serve")
_LIMITS = {"max_body_bytes": 1 << 20}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Any = None):
        super().__init__(message)
        self.status, self.message, self.type_, self.param = status, message, type_, param


def _err(status: int, message: str, type_: str = "invalid_request_error", param: Any = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param), status_code=status)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return _err(exc.status, exc.message, exc.type_, exc.param)


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


@app.middleware("http")
async def _body_limit(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > _LIMITS["max_body_bytes"]
        except ValueError:
            return _err(400, "bad Content-Length header")
        if too_big:
            return _err(413, f"request body over {_LIMITS['max_body_bytes']} bytes")
    return await call_next(request)


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
        self._index_handle = None
        _LIMITS["max_body_bytes"] = self.args.max_body_bytes

    # helpers -----------------------------------------------------------------------
    def _tenant(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return "k-" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:24]
        hdr = request.headers.get("x-semshare-tenant")
        if hdr and self.args.trust_tenant_header:
            if not TENANT_RE.match(hdr):
                raise APIError(400, "X-SemShare-Tenant must match [A-Za-z0-9_.-]{1,64}")
            return hdr
        return "default"

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

    async def _index(self):
        if self._index_handle is None:
            import asyncio

            a = self.args
            self._index_handle = await asyncio.to_thread(
                get_or_create_index_actor, a.index_name, a.index_namespace, a.semshare_config().fingerprint_dim,
                a.index_max_items, a.index_max_bytes, a.tenant_max_items, a.tenant_max_bytes)
        return self._index_handle

    async def _call_index(self, method: str, *args):
        import asyncio

        try:
            handle = await self._index()
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self.args.lookup_timeout_s * 5)
        except (asyncio.TimeoutError, RayActorError) as e:
            self._index_handle = None
            raise APIError(503, f"the cache index is unavailable ({type(e).__name__}); retry shortly",
                           type_="service_unavailable") from e

    async def _start(self, payload: dict):
        """Start generation; return ``(response_generator, first_event)`` or raise APIError."""
        try:
            gen = self.llm.options(stream=True).generate.remote(payload)
            first = await gen.__anext__()
        except BackPressureError as e:
            raise APIError(503, f"server overloaded, retry later ({e})", type_="overloaded") from e
        except RayActorError as e:
            raise APIError(503, f"model replica unavailable ({type(e).__name__}); retry",
                           type_="service_unavailable") from e
        except StopAsyncIteration as e:
            raise APIError(500, "generation produced no events", type_="internal_error") from e
        if first.get("type") == "error":
            raise APIError(first.get("status", 400), first.get("message", "bad request"),
                           first.get("error_type", "invalid_request_error"), param="prompt")
        return gen, first

    async def _events(self, gen, first) -> AsyncIterator[dict]:
        yield first
        async for ev in gen:
            yield ev

    # native --------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request):
        t0 = time.perf_counter()
        self._check_max_new(body.max_new_tokens, "max_new_tokens")
        self._check_prompt_chars(body.prompt)
        payload = {**body.model_dump(), "tenant": self._tenant(request)}
        gen, first = await self._start(payload)
        ttft = (time.perf_counter() - t0) * 1e3
        done = None
        async for ev in self._events(gen, first):
            if ev["type"] == "done":
                done = ev
        if done is None:
            raise APIError(500, "generation ended without a result", type_="internal_error")
        rt = done["timing"]
        return {**{k: done[k] for k in ("text", "used_semshare", "cache_hit", "ref_key", "retrieved_sim",
                                         "store_key", "replica", "finish_reason", "fallback", "usage")},
                "timing": {"ttft_ms": round(ttft, 3), "total_ms": round((time.perf_counter() - t0) * 1e3, 3),
                           "lookup_ms": rt["lookup_ms"], "kv_fetch_ms": rt["kv_fetch_ms"],
                           "prefill_ms": rt["prefill_ms"]}}

    @app.get("/v1/cache/stats")
    async def cache_stats(self, request: Request):
        stats = await self._call_index("stats", None)
        stats["caller_tenant"] = self._tenant(request)
        stats["default_sim_threshold"] = self.default_threshold
        return stats

    @app.post("/v1/cache/clear")
    async def cache_clear(self, request: Request, body: Optional[ClearRequest] = None):
        tenant = None if (body is not None and body.all_tenants) else self._tenant(request)
        removed = await self._call_index("clear", tenant)
        return {"cleared": removed, "tenant": tenant or "*"}

    @app.get("/health")
    @app.get("/v1/health")
    async def health(self):
        return {"status": "ok", "model": self.model_name}

    # OpenAI-compatible ---------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                             "owned_by": "semshare-serve"}]}

    def _openai_payload(self, body, request: Request) -> dict:
        self._check_model(body.model)
        max_new = body.max_completion_tokens or body.max_tokens or (16 if isinstance(body, CompletionRequest)
                                                                   else self.args.max_new_tokens)
        max_new = min(max_new, self.args.max_new_tokens) if not (body.max_tokens or body.max_completion_tokens) \
            else max_new
        self._check_max_new(max_new, "max_tokens")
        return {"max_new_tokens": max_new, "temperature": body.temperature, "top_p": body.top_p,
                "seed": body.seed, "use_semshare": body.use_semshare, "sim_threshold": body.sim_threshold,
                "tenant": self._tenant(request)}

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
        return await self._openai(body, payload, "text_completion", echo_prefix=prompt if body.echo else "")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self._check_prompt_chars("".join(m["content"] for m in messages))
        payload = {**self._openai_payload(body, request), "messages": messages}
        return await self._openai(body, payload, "chat.completion")

    async def _openai(self, body, payload: dict, kind: str, echo_prefix: str = ""):
        payload["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        created, rid = int(time.time()), ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        gen, first = await self._start(payload)

        def usage(done: dict) -> dict:
            u = done["usage"]
            return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                    "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                    "prompt_tokens_details": {"cached_tokens": u["reused_tokens"]}}

        def semshare(done: dict) -> dict:
            return {k: done[k] for k in ("cache_hit", "ref_key", "retrieved_sim", "store_key", "replica",
                                         "used_semshare", "fallback")}

        if not body.stream:
            done = None
            async for ev in self._events(gen, first):
                if ev["type"] == "done":
                    done = ev
            if done is None:
                raise APIError(500, "generation ended without a result", type_="internal_error")
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
                async for ev in self._events(gen, first):
                    if ev["type"] == "token" and ev["text"]:
                        yield _sse(chunk(ev["text"]))
                    elif ev["type"] == "done":
                        done = ev
                if done is None:
                    raise RuntimeError("generation ended without a result")
                final = chunk(None if kind == "chat.completion" else "", done["finish_reason"])
                final["semshare"] = semshare(done)
                yield _sse(final)
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_kind, "created": created, "model": self.model_name,
                                "choices": [], "usage": usage(done)})
            except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
                logger.exception("stream %s failed", rid)
                yield _sse(error_body(f"generation failed: {type(e).__name__}", "internal_error"))
            finally:
                gen.cancel()  # client gone or finished: stop decoding on the replica
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
