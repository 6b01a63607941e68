"""The HTTP edge: limits that keep slow or hostile clients from stalling the server.

Ray Serve's HTTP proxy (uvicorn) accepts the connection and parses the headers; it
then forwards the request to the ``Ingress`` replica *before* the body has arrived,
and the replica pulls the body from the proxy message by message. A request that
trickles its body therefore holds one of the Ingress replica's ongoing-request slots
for as long as it trickles. Two layers handle that:

1. **In the Ingress replica** (always on; :class:`BodyReader`, :func:`header_problem`,
   used by ``serve_app.ingress.Guard``): header count / size limits (431), a body-read
   deadline (``body_timeout_s``: 408), a bounded pool of requests still receiving their
   body (``max_receiving_requests``: 503 + Retry-After), and generation admission
   counted only once the body is complete. ``build_app`` sizes the Ingress
   deployment's ``max_ongoing_requests`` to hold both pools plus headroom, so health,
   readiness and a normal request still get a slot while the receiving pool is full.
   A client that hangs up is logged as ``cancelled`` (never a 500 or a traceback).

2. **In Serve's HTTP proxy** (opt-in, process-wide:
   ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http_edge:proxy_middlewares``
   in the environment of the Ray head / ``serve run``; the Makefile, the Dockerfile and
   the RayService manifest set it): a **header-read deadline** (uvicorn has none: a
   connection that sends nothing, or trickles its headers, is answered 408 and closed),
   a header size / count limit enforced while the bytes arrive (431 before an 8 MB
   header is buffered), and :class:`ProxyEdgeMiddleware`, which buffers small bodies
   in the proxy under a deadline (408) with its own bounded receiving pool (503), so a
   trickling request never reaches Serve's router at all. Settings: the
   ``SEMSHARE_EDGE_*`` environment variables below.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

logger = logging.getLogger("ray.serve")

Receive = Callable[[], Awaitable[dict]]

# proxy-layer settings (environment of the proxy process)
ENV_HEADER_TIMEOUT = "SEMSHARE_EDGE_HEADER_TIMEOUT_S"
ENV_BODY_TIMEOUT = "SEMSHARE_EDGE_BODY_TIMEOUT_S"
ENV_MAX_HEADER_BYTES = "SEMSHARE_EDGE_MAX_HEADER_BYTES"
ENV_MAX_HEADERS = "SEMSHARE_EDGE_MAX_HEADERS"
ENV_MAX_RECEIVING = "SEMSHARE_EDGE_MAX_RECEIVING"
ENV_MAX_BUFFER = "SEMSHARE_EDGE_MAX_BUFFER_BYTES"


def error_json(message: str, type_: str, code: Optional[str] = None) -> bytes:
    """The API's one error shape (same as ``serve_app.schemas.error_body``)."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}},
                      separators=(",", ":")).encode()


async def send_error(send, status: int, message: str, type_: str, code: Optional[str] = None,
                     headers: Optional[dict] = None, close: bool = False) -> None:
    body = error_json(message, type_, code)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        hdrs.append((b"connection", b"close"))
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# headers Serve's proxy adds to a request before the app sees it (RequestIdMiddleware:
# ``x-request-id`` when the client sent none): not the client's, so not counted
PROXY_ADDED_HEADERS = (b"x-request-id",)


def header_problem(headers: list, max_bytes: int, max_count: int,
                   ignore: tuple = PROXY_ADDED_HEADERS) -> Optional[str]:
    """Why ``scope["headers"]`` is refused (431), or None.

    Headers named in ``ignore`` (the proxy's own ``x-request-id``) count neither against
    ``max_count`` nor ``max_bytes``: a client sending exactly ``max_count`` headers is
    accepted whether the proxy added one or not (one the client sent itself is not counted
    either: the limits stay within one header of what they say).
    """
    headers = [(k, v) for k, v in headers if k.lower() not in ignore]
    if len(headers) > max_count:
        return f"too many request headers ({len(headers)} > {max_count})"
    size = sum(len(k) + len(v) + 4 for k, v in headers)
    if size > max_bytes:
        return f"request headers too large ({size} bytes > {max_bytes})"
    return None


@dataclass
class BodyOutcome:
    """What reading a body gave: ``body`` (complete), or ``status``/``message`` to answer,
    or ``cancelled`` (the client hung up: nothing to answer)."""

    body: Optional[bytes] = None
    status: int = 0
    message: str = ""
    code: Optional[str] = None
    cancelled: bool = False


class BodyReader:
    """Reads a request body under a size limit and a deadline, counting who is receiving.

    ``receiving`` is the number of requests whose body is still arriving; past
    ``max_receiving`` a new one is refused (503) at once instead of waiting for a slot,
    unless its whole body has already arrived (what a normal client sends: headers and
    body together): such a request needs no slot, so clients that hold the pool with
    trickling bodies never starve the others.
    """

    WHOLE_GRACE_S = 0.1  # how long a request met by a full pool may take to show its body is all there

    def __init__(self, max_receiving: int, timeout_s: float):
        self.max_receiving, self.timeout_s = max_receiving, timeout_s
        self.receiving = 0
        self.counters = {"body_timeouts": 0, "receiving_full": 0, "cancelled": 0, "whole_past_full": 0}

    def full(self) -> bool:
        return self.receiving >= self.max_receiving

    async def _arrived_whole(self, receive: Receive, limit: int) -> Optional[BodyOutcome]:
        """The outcome if the body's first message is all of it (or a disconnect / over the
        limit); None if more is still on its way (or nothing came within the grace)."""
        try:
            msg = await asyncio.wait_for(receive(), self.WHOLE_GRACE_S)
        except asyncio.TimeoutError:
            return None
        out = self._take(msg, [], 0, limit)
        if out is not None and out.body is not None:
            self.counters["whole_past_full"] += 1
        return out

    async def read(self, receive: Receive, limit: int) -> BodyOutcome:
        if self.full():
            whole = await self._arrived_whole(receive, limit)
            if whole is not None:
                return whole
            self.counters["receiving_full"] += 1
            return BodyOutcome(status=503, message=f"too many requests still sending their body "
                               f"({self.receiving}); retry later", code="receiving_full")
        self.receiving += 1
        try:
            return await asyncio.wait_for(self._read(receive, limit), self.timeout_s)
        except asyncio.TimeoutError:
            self.counters["body_timeouts"] += 1
            return BodyOutcome(status=408, message=f"the request body did not arrive within "
                               f"{self.timeout_s:g}s", code="body_timeout")
        except asyncio.CancelledError:  # Serve cancels the request when the client hangs up
            self.counters["cancelled"] += 1
            logger.info("request cancelled while receiving its body: the client disconnected")
            raise
        except Exception as e:  # noqa: BLE001 - the proxy dropped the request: the client is gone
            self.counters["cancelled"] += 1
            logger.info("request cancelled while receiving its body (%s)", type(e).__name__)
            return BodyOutcome(cancelled=True)
        finally:
            self.receiving -= 1

    async def _read(self, receive: Receive, limit: int) -> BodyOutcome:
        chunks: list[bytes] = []
        received = 0
        while True:
            out = self._take(await receive(), chunks, received, limit)
            if out is not None:
                return out
            received += len(chunks[-1])

    def _take(self, msg: dict, chunks: list[bytes], received: int, limit: int) -> Optional[BodyOutcome]:
        """One ``receive()`` message after ``received`` bytes (kept in ``chunks``): the outcome
        once the body is complete, the client gone or the limit passed; None while more comes."""
        if msg["type"] == "http.disconnect":
            self.counters["cancelled"] += 1
            logger.info("request cancelled: client disconnected while sending its body")
            return BodyOutcome(cancelled=True)
        body = msg.get("body", b"")
        if received + len(body) > limit:
            return BodyOutcome(status=413, message=f"request body over {limit} bytes", code="body_too_large")
        chunks.append(body)
        return None if msg.get("more_body", False) else BodyOutcome(body=b"".join(chunks))


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that returns ``body`` once, then defers to the real one (disconnects).

    If the real one fails after the body (the proxy dropped the request: the client is
    gone), it reports a disconnect instead of raising.
    """
    sent = False

    async def _receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            return await receive()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client is gone
            return {"type": "http.disconnect"}
    return _receive


# ---------------------------------------------------------------------------------------
# proxy layer

def _env_float(name: str, default: float) -> float:
    try:
        v = float(os.environ.get(name, default))
        return v if v > 0 else default
    except ValueError:
        return default


def _env_int(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, default))
        return v if v > 0 else default
    except ValueError:
        return default


class ProxyEdgeMiddleware:
    """ASGI middleware for Serve's proxy: header limits, and bodies up to ``max_buffer_bytes``
    buffered under ``body_timeout_s`` before the request is routed to a replica. A larger
    body is passed through as it arrives (the Ingress enforces its own limit and deadline)."""

    def __init__(self, app, body_timeout_s: float = 30.0, max_receiving: int = 1024,
                 max_buffer_bytes: int = 2 << 20, max_header_bytes: int = 32768, max_headers: int = 100):
        self.app = app
        self.reader = BodyReader(max_receiving, body_timeout_s)
        self.max_buffer_bytes = max_buffer_bytes
        self.max_header_bytes, self.max_headers = max_header_bytes, max_headers

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        problem = header_problem(scope.get("headers") or [], self.max_header_bytes, self.max_headers)
        if problem:
            return await send_error(send, 431, problem, "invalid_request_error", "headers_too_large", close=True)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = None
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                length = v
        if length is not None and (not length.isdigit() or int(length) > self.max_buffer_bytes):
            return await self.app(scope, receive, send)  # the Ingress answers 400 / 413
        out = await self.reader.read(receive, self.max_buffer_bytes)
        if out.cancelled:
            return None
        if out.status == 413:  # chunked and large: not ours to judge, the Ingress has the limit
            return await send_error(send, 413, out.message, "invalid_request_error", out.code, close=True)
        if out.status:
            hdrs = {"Retry-After": "1"} if out.status == 503 else None
            return await send_error(send, out.status, out.message,
                                    "timeout" if out.status == 408 else "overloaded", out.code, hdrs, close=True)
        return await self.app(scope, replay(out.body, receive), send)


_STATUS_LINE = {408: b"HTTP/1.1 408 Request Timeout\r\n", 431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n"}


class _HeaderWatch:
    """Per-connection header deadline and size / count limits, fed the raw bytes.

    States: ``headers`` (the deadline runs: a new connection, or the first bytes after a
    response), ``request`` (headers done: body and response, no deadline here), ``idle``
    (response sent; uvicorn's keep-alive timeout applies)."""

    def __init__(self, proto, timeout_s: float, max_bytes: int, max_headers: int):
        self.proto, self.timeout_s = proto, timeout_s
        self.max_bytes, self.max_headers = max_bytes, max_headers
        self.timer: Optional[asyncio.TimerHandle] = None
        self.state = "idle"
        self.count = self.lines = 0
        self.tail = b""
        self.arm()  # a connection that sends nothing at all also gets the deadline

    def arm(self) -> None:
        self.cancel()
        self.state, self.count, self.lines, self.tail = "headers", 0, 0, b""
        self.timer = asyncio.get_event_loop().call_later(self.timeout_s, self.expired)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def idle(self) -> None:  # response sent: the next bytes start a new request
        if self.state == "request":
            self.state = "idle"

    def feed(self, data: bytes) -> bool:
        """False: the connection was refused (431) and closed."""
        if self.state == "request":
            return True
        if self.state == "closed":
            return False
        if self.state == "idle":
            self.arm()
        self.count += len(data)
        window = self.tail + data
        end = window.find(b"\r\n\r\n")
        self.lines += (window if end < 0 else window[:end]).count(b"\n") - self.tail.count(b"\n")
        if end >= 0:
            self.cancel()
            self.state = "request"
            size = self.count - len(data) + end - len(self.tail)
            if size > self.max_bytes or self.lines > self.max_headers + 1:
                return self.refuse(431, "request headers too large or too many")
            return True
        self.tail = window[-3:]
        if self.count > self.max_bytes or self.lines > self.max_headers + 1:
            return self.refuse(431, "request headers too large or too many")
        return True

    def expired(self) -> None:
        self.timer = None
        if self.state == "headers":
            self.refuse(408, f"request headers did not arrive within {self.timeout_s:g}s")

    def refuse(self, status: int, message: str) -> bool:
        self.cancel()
        self.state = "closed"
        t = getattr(self.proto, "transport", None)
        if t is not None and not t.is_closing():
            body = error_json(message, "invalid_request_error" if status == 431 else "timeout",
                              "headers_too_large" if status == 431 else "header_timeout")
            t.write(_STATUS_LINE[status] + b"content-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            t.close()
        return False


def install_header_watch(timeout_s: float, max_bytes: int, max_headers: int) -> list[str]:
    """Patch uvicorn's HTTP protocols (in this process) with :class:`_HeaderWatch`.

    uvicorn has no header-read timeout; this adds one, plus limits applied while the
    header bytes arrive. Idempotent; returns the protocol classes patched."""
    patched = []
    classes = []
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        classes.append(HttpToolsProtocol)
    except ImportError:
        pass
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        classes.append(H11Protocol)
    except ImportError:
        pass
    for cls in classes:
        if getattr(cls, "_semshare_header_watch", None) is not None:
            cls._semshare_header_watch = (timeout_s, max_bytes, max_headers)
            patched.append(cls.__name__)
            continue
        cls._semshare_header_watch = (timeout_s, max_bytes, max_headers)
        made, data, lost, done = cls.connection_made, cls.data_received, cls.connection_lost, \
            cls.on_response_complete

        def connection_made(self, transport, _made=made):
            _made(self, transport)
            self._sw = _HeaderWatch(self, *type(self)._semshare_header_watch)

        def data_received(self, data_, _data=data):
            sw = getattr(self, "_sw", None)
            if sw is not None and not sw.feed(data_):
                return
            _data(self, data_)

        def connection_lost(self, exc, _lost=lost):
            sw = getattr(self, "_sw", None)
            if sw is not None:
                sw.cancel()
            _lost(self, exc)

        def on_response_complete(self, _done=done):
            _done(self)
            sw = getattr(self, "_sw", None)
            if sw is not None:
                sw.idle()

        cls.connection_made, cls.data_received = connection_made, data_received
        cls.connection_lost, cls.on_response_complete = connection_lost, on_response_complete
        patched.append(cls.__name__)
    return patched


def edge_settings() -> dict[str, Any]:
    return {
        "header_timeout_s": _env_float(ENV_HEADER_TIMEOUT, 10.0),
        "body_timeout_s": _env_float(ENV_BODY_TIMEOUT, 30.0),
        "max_header_bytes": _env_int(ENV_MAX_HEADER_BYTES, 32768),
        "max_headers": _env_int(ENV_MAX_HEADERS, 100),
        "max_receiving": _env_int(ENV_MAX_RECEIVING, 1024),
        "max_buffer_bytes": _env_int(ENV_MAX_BUFFER, 2 << 20),
    }


def proxy_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http_edge:proxy_middlewares``.

    Called once in each Serve HTTP proxy process before its server starts."""
    from starlette.middleware import Middleware

    s = edge_settings()
    patched = install_header_watch(s["header_timeout_s"], s["max_header_bytes"], s["max_headers"])
    logger.info("semshare http edge in the proxy: %s (patched %s)", s, patched)
    return [Middleware(ProxyEdgeMiddleware, body_timeout_s=s["body_timeout_s"], max_receiving=s["max_receiving"],
                       max_buffer_bytes=s["max_buffer_bytes"], max_header_bytes=s["max_header_bytes"],
                       max_headers=s["max_headers"])]
