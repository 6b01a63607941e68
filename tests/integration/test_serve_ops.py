"""Operating the app (issue 10): readiness, models, cache_salt, metrics, access log, strict
types, and an HTTP edge that slow clients cannot stall. Shares the session app (open mode,
default edge settings: body_timeout_s=10). The readiness test kills the index actor and
leaves it serving again; this file sorts after test_serve_app on purpose."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import socket
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from semshare_core.models import corpus_text
from serve_app.ingress import salted_tenant

pytestmark = pytest.mark.ray

_CORPUS = corpus_text()
BODY_TIMEOUT_S = 10.0  # AppArgs default, used by the session app


def passage(i: int, chars: int = 600) -> str:
    start = 7000 + i * 8500
    text = " ".join(_CORPUS[start:start + chars].split())
    assert len(text) > 300
    return text


def is_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# models / health / ready -------------------------------------------------------------------

def test_model_by_id(server):
    mid = server.http.get("/v1/models").json()["data"][0]["id"]
    r = server.http.get(f"/v1/models/{mid}")
    assert r.status_code == 200 and r.json()["id"] == mid and r.json()["object"] == "model"
    err = is_error(server.http.get("/v1/models/not-" + mid), 404)
    assert err["type"] == "not_found_error" and mid in err["message"]
    is_error(server.http.get("/v1/models/org/with-slash"), 404)


def test_health_is_cheap_and_ready_is_200(server):
    t = time.perf_counter()
    h = server.http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert time.perf_counter() - t < 5
    deadline = time.time() + 120  # the index actor's process may still be starting (503 meanwhile)
    while (r := server.http.get("/ready")).status_code != 200:
        assert r.status_code == 503 and r.json()["status"] == "not_ready", r.text
        assert time.time() < deadline, r.text
        time.sleep(1)
    assert r.json()["status"] == "ready" and r.json()["checks"] == {"model": True, "index": True}


# cache_salt ---------------------------------------------------------------------------------

def test_cache_salt_isolates_and_same_salt_shares(server):
    p = passage(31)
    salt_a, salt_b = "salt-a-" + uuid.uuid4().hex, "salt-b-" + uuid.uuid4().hex
    first = server.gen(p, temperature=0, max_new_tokens=2, cache_salt=salt_a)
    assert first["cache_hit"] is False
    server.wait_entries(1, tenant=salted_tenant("default", salt_a))
    # another salt, and no salt at all: the entry is not visible
    other = server.gen(p, temperature=0, max_new_tokens=2, cache_salt=salt_b)
    assert other["cache_hit"] is False, other
    plain = server.gen(p, temperature=0, max_new_tokens=2, use_semshare=True)
    assert plain["cache_hit"] is False, plain
    # the same salt (native and OpenAI routes) shares it
    same = server.gen(p, temperature=0, max_new_tokens=2, cache_salt=salt_a)
    assert same["cache_hit"] is True and same["usage"]["reused_tokens"] > 0, same
    r = server.http.post("/v1/completions", json={"prompt": p, "max_tokens": 2, "temperature": 0,
                                                  "cache_salt": salt_a})
    assert r.status_code == 200 and r.json()["semshare"]["cache_hit"] is True
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # the salt is a namespace of the tenant: another tenant with the same salt does not see it
    r = server.http.post("/v1/generate", json={"prompt": p, "max_new_tokens": 2, "temperature": 0,
                                               "cache_salt": salt_a}, headers={"X-Tenant": "salt-other"})
    assert r.status_code == 200 and r.json()["cache_hit"] is False
    # stats and clear address the salted namespace
    st = server.http.get("/v1/cache/stats", params={"cache_salt": salt_a}).json()
    assert st["entries"] >= 1 and st["tenant"] == salted_tenant("default", salt_a)
    c = server.http.post("/v1/cache/clear", json={"cache_salt": salt_a})
    assert c.status_code == 200 and c.json()["cleared"] >= 1
    assert server.http.get("/v1/cache/stats", params={"cache_salt": salt_a}).json()["entries"] == 0


def test_cache_salt_must_be_a_string(server):
    for bad in (123, "", ["x"], True):
        is_error(server.http.post("/v1/generate", json={"prompt": "hi", "cache_salt": bad}), 422)
        is_error(server.http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "cache_salt": bad}), 422)


# strict types and one error shape ------------------------------------------------------------

ROUTES = {
    "/v1/generate": lambda **kw: {"prompt": "hi", **{("max_new_tokens" if k == "max" else k): v for k, v in kw.items()}},
    "/v1/completions": lambda **kw: {"prompt": "hi", **{("max_tokens" if k == "max" else k): v for k, v in kw.items()}},
    "/v1/chat/completions": lambda **kw: {"messages": [{"role": "user", "content": "hi"}],
                                          **{("max_tokens" if k == "max" else k): v for k, v in kw.items()}},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("field,value,needle", [
    ("max", "5", "valid integer"), ("max", True, "valid integer"), ("max", 5.0, "valid integer"),
    ("temperature", "0.5", "valid number"), ("temperature", True, "valid number"),
    ("seed", "1", "valid integer"),
])
def test_no_coercion_same_error_everywhere(server, route, field, value, needle):
    err = is_error(server.http.post(route, json=ROUTES[route](**{field: value})), 422)
    assert needle in err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_nan_temperature_message(server, route, raw):
    body = json.dumps(ROUTES[route]()).rstrip("}") + f', "temperature": {raw}}}'
    r = server.http.post(route, content=body, headers={"content-type": "application/json"})
    err = is_error(r, 422)
    assert "finite number" in err["message"] and err["param"] == "temperature", err


def test_lone_surrogate_is_a_clean_422_everywhere(server):
    bad = '"a\\ud800b"'
    bodies = {
        "/v1/generate": '{"prompt": %s}' % bad,
        "/v1/completions": '{"prompt": %s}' % bad,
        "/v1/chat/completions": '{"messages": [{"role": "user", "content": %s}]}' % bad,
    }
    items = list(bodies.items()) + [  # every string field, not only the prompt
        ("/v1/completions", '{"prompt": "hi", "user": %s}' % bad),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "model": %s}' % bad),
    ]
    for route, body in items:
        err = is_error(server.http.post(route, content=body, headers={"content-type": "application/json"}), 422)
        assert "lone surrogate" in err["message"], (route, err)
        assert "template" not in err["message"]


def test_native_route_accepts_stop(server):
    p = passage(33)
    base = server.gen(p, temperature=0, max_new_tokens=12, use_semshare=False)
    assert base["finish_reason"] == "length" and len(base["text"]) > 4
    stop = base["text"][2:4]
    r = server.gen(p, temperature=0, max_new_tokens=12, use_semshare=False, stop=[stop])
    assert r["finish_reason"] == "stop" and stop not in r["text"]
    assert base["text"].startswith(r["text"])
    is_error(server.http.post("/v1/generate", json={"prompt": "hi", "stop": 5}), 422)


# metrics and access log ---------------------------------------------------------------------

def _metrics_url() -> str:
    import ray

    node = [n for n in ray.nodes() if n["Alive"]][0]
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def _scrape(url: str) -> dict[str, float]:
    """{metric name: sum over its series}, for the semshare_* metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "semshare" not in line:
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def _value(snap: dict, name: str) -> float:
    for k in (name, name + "_total"):
        if k in snap:
            return snap[k]
    return 0.0


def test_metrics_counters_move_on_a_hit(server):
    url = _metrics_url()
    p = passage(35)
    server.gen(p, temperature=0, max_new_tokens=2, store_key="metrics-hit")
    server.wait_entries(1)
    deadline = time.time() + 90  # Ray exports metrics every few seconds
    before = _scrape(url)
    while _value(before, "ray_semshare_prompt_tokens") == 0:
        assert time.time() < deadline, f"no semshare metrics exported at {url}: {sorted(before)}"
        time.sleep(2)
        before = _scrape(url)
    hit = server.gen(p, temperature=0, max_new_tokens=2)
    assert hit["cache_hit"] is True
    want_prompt = _value(before, "ray_semshare_prompt_tokens") + hit["usage"]["prompt_tokens"]
    want_cached = _value(before, "ray_semshare_cached_tokens") + hit["usage"]["reused_tokens"]
    while True:
        after = _scrape(url)
        if (_value(after, "ray_semshare_prompt_tokens") >= want_prompt
                and _value(after, "ray_semshare_cached_tokens") >= want_cached):
            break
        assert time.time() < deadline, (before, after)
        time.sleep(2)
    assert _value(after, "ray_semshare_http_requests") > _value(before, "ray_semshare_http_requests")
    # TTFT in seconds: the histogram's sum grows by about the request's ttft (not milliseconds)
    d_sum = _value(after, "ray_semshare_ttft_seconds_sum") - _value(before, "ray_semshare_ttft_seconds_sum")
    d_cnt = _value(after, "ray_semshare_ttft_seconds_count") - _value(before, "ray_semshare_ttft_seconds_count")
    assert d_cnt >= 1 and 0 < d_sum / d_cnt < 30, (d_sum, d_cnt)
    assert "ray_semshare_requests_running" in after or "ray_semshare_requests_receiving" in after


def _ingress_logs() -> list[str]:
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    return glob.glob(os.path.join(logs, "serve", "replica_semshare_Ingress_*.log"))


def _grep_logs(needle: str, timeout: float = 20) -> list[str]:
    deadline = time.time() + timeout
    while True:
        lines = []
        for path in _ingress_logs():
            with open(path, errors="replace") as f:
                lines += [ln for ln in f if needle in ln]
        if lines or time.time() > deadline:
            return lines
        time.sleep(0.5)


def test_access_log_line_carries_its_fields(server):
    tenant = "acc-" + uuid.uuid4().hex[:12]
    p = passage(37)
    secret = "zebra-canary-" + uuid.uuid4().hex
    for _ in range(2):
        r = server.http.post("/v1/generate", json={"prompt": p + " " + secret, "max_new_tokens": 2, "temperature": 0},
                             headers={"X-Tenant": tenant})
        assert r.status_code == 200
        server.wait_entries(1, tenant=tenant)
    assert r.json()["cache_hit"] is True
    lines = [ln for ln in _grep_logs(f"tenant={tenant}") if " access " in ln or ln.startswith("access")]
    assert len(lines) >= 2, lines
    fields = dict(kv.split("=", 1) for kv in lines[-1].split(" access ", 1)[1].split() if "=" in kv)
    assert fields["route"] == "/v1/generate" and fields["status"] == "200" and fields["outcome"] == "hit"
    assert fields["cache_hit"] == "true" and float(fields["similarity"]) > 0.9
    assert int(fields["reused_tokens"]) > 0 and int(fields["prompt_tokens"]) >= int(fields["reused_tokens"])
    assert 0 < float(fields["ttft_s"]) < 60
    assert not _grep_logs(secret, timeout=0), "prompt text must not be logged"


# the HTTP edge --------------------------------------------------------------------------------

def _trickler(port: int, path: str = "/v1/generate") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: 4000\r\n\r\n{{".encode())
    return s


def _status_of(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_trickling_bodies_do_not_stall_the_server(server):
    port = int(server.base.rsplit(":", 1)[1])
    n = 100
    t0 = time.time()
    socks = [_trickler(port) for _ in range(n)]
    try:
        time.sleep(1.0)  # they all reached the ingress and hold a receiving slot
        t = time.perf_counter()
        h = httpx.get(server.base + "/health", timeout=10)
        assert h.status_code == 200 and time.perf_counter() - t < 3, "health stalled by slow clients"
        t = time.perf_counter()
        g = httpx.post(server.base + "/v1/generate", json={"prompt": passage(39), "max_new_tokens": 2}, timeout=30)
        assert g.status_code == 200, g.text
        assert time.perf_counter() - t < 15, "a normal request stalled by slow clients"
        # every trickler ends with 408 (deadline) or 503 (receiving pool full), within the deadline
        with ThreadPoolExecutor(16) as ex:
            codes = list(ex.map(_status_of, socks))
        elapsed = time.time() - t0
        assert all(c in (408, 503) for c in codes), sorted(set(codes))
        assert codes.count(408) > 0
        assert elapsed < BODY_TIMEOUT_S + 10, elapsed
    finally:
        for s in socks:
            s.close()


def _log_offsets() -> dict[str, int]:
    return {p: os.path.getsize(p) for p in _ingress_logs()}


def _new_log_lines(offsets: dict[str, int]) -> list[str]:
    out = []
    for path in _ingress_logs():
        with open(path, "rb") as f:
            f.seek(offsets.get(path, 0))
            out += f.read().decode("utf-8", "replace").splitlines()
    return out


def test_client_hangups_are_cancelled_not_500(server):
    port = int(server.base.rsplit(":", 1)[1])
    offsets = _log_offsets()
    socks = [_trickler(port) for _ in range(20)]
    time.sleep(1.0)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        s.close()
    assert server.http.get("/health").status_code == 200
    deadline = time.time() + 20
    while True:
        new = _new_log_lines(offsets)
        cancelled = [ln for ln in new if "cancelled" in ln]
        if len(cancelled) >= 20 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(cancelled) >= 20, f"each hang-up is logged as cancelled: {len(cancelled)}"
    assert not any("unhandled error" in ln or "Traceback" in ln for ln in new), \
        [ln for ln in new if "unhandled" in ln or "Traceback" in ln][:3]
    assert not any(" 500 " in ln for ln in new), [ln for ln in new if " 500 " in ln][:3]


def test_exactly_max_header_count_client_headers_pass(server):
    """Serve's proxy adds x-request-id before the app counts: the limit is the client's headers."""
    from serve_app.settings import AppArgs

    limit = AppArgs.model_fields["max_header_count"].default  # the integration app keeps the default
    base = {"host", "accept", "accept-encoding", "connection", "user-agent"}  # what httpx sends on a GET
    with httpx.Client(base_url=server.base, timeout=30) as c:
        extra = {f"x-h-{i}": "v" for i in range(limit - len(base))}
        assert c.get("/health", headers=extra).status_code == 200
        extra["x-one-more"] = "v"
        is_error(c.get("/health", headers=extra), 431)


@pytest.mark.parametrize("headers,label", [
    ({f"x-h-{i}": "v" for i in range(200)}, "count"),
    ({"x-big": "v" * 64 * 1024}, "size"),
])
def test_header_limits_are_431(server, headers, label):
    for path in ("/health", "/v1/generate"):
        r = httpx.post(server.base + path, json={"prompt": "hi"}, headers=headers, timeout=30) \
            if path != "/health" else httpx.get(server.base + path, headers=headers, timeout=30)
        err = is_error(r, 431)
        assert "header" in err["message"]


# readiness follows the index actor (kills it; leaves it serving) ---------------------------------

def test_ready_is_503_without_the_index_actor_and_200_when_it_returns(server):
    import ray

    assert server.http.get("/ready").status_code == 200
    ray.kill(server.index_actor(), no_restart=True)
    r = server.http.get("/ready")
    body = r.json()
    assert r.status_code == 503, body
    assert body["status"] == "not_ready" and "index" in body["reason"] and body["checks"]["model"] is True
    assert body["error"]["type"] == "service_unavailable" and r.headers.get("retry-after")
    # liveness does not depend on it
    assert server.http.get("/health").status_code == 200
    deadline = time.time() + 120
    while True:
        r = server.http.get("/ready")
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        assert time.time() < deadline, r.text
        time.sleep(1)
    assert ray.get(server.index_actor().ping.remote(), timeout=30)["ok"]
    # and reuse works again
    p = passage(41)
    server.gen(p, temperature=0, max_new_tokens=2, store_key="after-ready")
    server.wait_entries(1)
    assert server.gen(p, temperature=0, max_new_tokens=2)["cache_hit"] is True
