"""serve_app.http_edge's proxy layer on a real uvicorn server (loopback, no Ray): the
header-read deadline, header limits while the bytes arrive, the body deadline and the
bounded receiving pool; a healthy request still answers while 100 clients trickle, and while
the pool is full."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from serve_app.http_edge import ProxyEdgeMiddleware, header_problem, install_header_watch

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.5, 2.0


async def echo_app(scope, receive, send):
    assert scope["type"] == "http"
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    out = json.dumps({"path": scope["path"], "len": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def edge_server():
    install_header_watch(HEADER_TIMEOUT_S, max_bytes=8192, max_headers=50)
    app = ProxyEdgeMiddleware(echo_app, body_timeout_s=BODY_TIMEOUT_S, max_receiving=150,
                              max_buffer_bytes=1 << 16, max_header_bytes=8192, max_headers=50)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan="off", log_level="warning",
                                           timeout_keep_alive=5))
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    t.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield port
    server.should_exit = True
    t.join(10)


def status_and_body(s: socket.socket, timeout: float) -> tuple[int, dict]:
    s.settimeout(timeout)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            if length and len(rest) >= length[0]:
                break
    if not data:
        return 0, {}
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), (json.loads(rest) if rest.startswith(b"{") else {})


def test_a_normal_request_passes(edge_server):
    r = httpx.post(f"http://127.0.0.1:{edge_server}/x", content=b"a" * 1000, timeout=10)
    assert r.status_code == 200 and r.json() == {"path": "/x", "len": 1000}


def test_header_read_deadline(edge_server):
    # trickled headers, and a connection that sends nothing: both get 408 and are closed
    t0 = time.time()
    s1 = socket.create_connection(("127.0.0.1", edge_server))
    s1.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    s2 = socket.create_connection(("127.0.0.1", edge_server))
    for s in (s1, s2):
        status, body = status_and_body(s, HEADER_TIMEOUT_S + 5)
        assert status == 408 and body["error"]["code"] == "header_timeout"
        assert s.recv(10) == b""  # closed
        s.close()
    assert time.time() - t0 < HEADER_TIMEOUT_S + 3


def test_keepalive_connection_gets_a_fresh_header_deadline(edge_server):
    with httpx.Client(base_url=f"http://127.0.0.1:{edge_server}", timeout=10) as c:
        for _ in range(3):
            assert c.get("/a").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 2)  # idle between requests is not a header timeout


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(80)) + b"\r\n",
])
def test_header_limits_431_while_arriving(edge_server, raw):
    s = socket.create_connection(("127.0.0.1", edge_server))
    try:
        s.sendall(raw)
    except OSError:
        pass  # the server may close before it has read everything
    status, body = status_and_body(s, 5)
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    s.close()


def test_header_problem():
    assert header_problem([(b"a", b"b")] * 3, 1000, 2).startswith("too many")
    assert header_problem([(b"a", b"b" * 2000)], 1000, 10).startswith("request headers too large")
    assert header_problem([(b"a", b"b")], 1000, 10) is None
    # the proxy's own x-request-id does not count: exactly max_count client headers pass
    client = [(b"h%d" % i, b"v") for i in range(10)]
    assert header_problem(client + [(b"x-request-id", b"0" * 36)], 10**6, 10) is None
    assert header_problem(client + [(b"x-request-id", b"0" * 36)], sum(len(k) + 5 for k, _ in client), 10) is None
    assert header_problem(client + [(b"x", b"v")], 10**6, 10).startswith("too many")


def test_trickling_bodies_time_out_and_do_not_stall(edge_server):
    n = 100
    t0 = time.time()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", edge_server))
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        socks.append(s)
    t = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{edge_server}/fast", content=b"{}", timeout=10)
    assert r.status_code == 200 and time.perf_counter() - t < 1.0
    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(lambda s: status_and_body(s, BODY_TIMEOUT_S + 5), socks))
    assert {st for st, _ in results} == {408}, {st for st, _ in results}
    assert all(b["error"]["code"] == "body_timeout" for _, b in results)
    assert time.time() - t0 < BODY_TIMEOUT_S + 4
    for s in socks:
        s.close()


def test_receiving_pool_is_bounded(edge_server):
    socks = []
    try:
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", edge_server))
            s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
            socks.append(s)
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", edge_server))
        extra.sendall(b"POST /one-too-many HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        status, body = status_and_body(extra, 5)
        assert status == 503 and body["error"]["code"] == "receiving_full"
        extra.close()
        # a normal request (headers and body together) needs no slot: the full pool does not starve it
        r = httpx.post(f"http://127.0.0.1:{edge_server}/normal", content=b"a" * 1000, timeout=10)
        assert r.status_code == 200 and r.json() == {"path": "/normal", "len": 1000}
    finally:
        for s in socks:
            s.close()
