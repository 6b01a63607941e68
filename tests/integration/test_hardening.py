"""The keyed app at /h (see ``hardened`` in conftest): auth, tenants, quotas, limits,
timeouts, admission, and a replica killed mid-stream."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import H_ADMIN, H_INDEX, INDEX_NS
from semshare_core.models import corpus_text

pytestmark = pytest.mark.ray

_CORPUS = corpus_text()
ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def text(i: int, chars: int = 400) -> str:
    start = 31000 + i * 7000
    return " ".join(_CORPUS[start:start + chars].split())


def gen(h: httpx.Client, key: str, prompt: str, **kw) -> httpx.Response:
    body = {"prompt": prompt, "temperature": 0, "max_new_tokens": 2, **kw}
    return h.post("/v1/generate", json=body, headers=auth(key))


def is_json_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["message"]
    if type_:
        assert err["type"] == type_, err
    return err


def sse(body: str) -> list:
    out = []
    for block in body.split("\n\n"):
        block = block.strip()
        if block:
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_tenant_entries(tenant: str, n: int, timeout: float = 30) -> None:
    import ray

    actor = ray.get_actor(H_INDEX, namespace=INDEX_NS)
    deadline = time.time() + timeout
    while ray.get(actor.stats.remote())["tenants"].get(tenant, {}).get("entries", 0) < n:
        assert time.time() < deadline, f"{tenant} never reached {n} entries"
        time.sleep(0.2)


# auth ------------------------------------------------------------------------------------

def test_health_needs_no_key(hardened):
    for path in ("/health", "/v1/health"):
        assert hardened.get(path).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong-0123456789"},
                                     {"Authorization": "Basic c2stYWxpY2U="}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Bearer {ALICE}x"}, {"X-Tenant": "alice"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/v1/cache/stats"),
                                         ("POST", "/v1/generate"), ("POST", "/v1/cache/clear"),
                                         ("GET", "/openapi.json"), ("GET", "/no/such/route")])
def test_every_route_but_health_needs_a_key(hardened, headers, method, path):
    r = hardened.request(method, path, headers=headers, json={"prompt": "hello"} if method == "POST" else None)
    err = is_json_error(r, 401, "authentication_error")
    assert err["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_keys_map_to_tenants_and_isolate_them(hardened):
    p = text(0)
    first = gen(hardened, ALICE, p, store_key="alice-doc")
    assert first.status_code == 200 and first.json()["cache_hit"] is False
    wait_tenant_entries("alice", 1)
    # bob, even claiming alice's tenant by header, never sees alice's entry
    bob = hardened.post("/v1/generate", json={"prompt": p, "temperature": 0, "max_new_tokens": 2},
                        headers={**auth(BOB), "X-Tenant": "alice", "X-SemShare-Tenant": "alice"})
    assert bob.status_code == 200 and bob.json()["cache_hit"] is False
    again = gen(hardened, ALICE, p).json()
    assert again["cache_hit"] is True and again["ref_key"] == "alice-doc"
    # stats: own tenant only, no other tenant's name anywhere
    st = hardened.get("/v1/cache/stats", headers=auth(BOB))
    assert st.status_code == 200
    body = st.json()
    assert body["tenant"] == "bob" and body["admin"] is False and "tenants" not in body
    assert "alice" not in st.text
    mine = hardened.get("/v1/cache/stats", headers=auth(ALICE)).json()
    assert mine["tenant"] == "alice" and mine["entries"] >= 1 and mine["hits"] >= 1


def test_clear_is_per_tenant_and_admin_may_clear_all(hardened):
    gen(hardened, BOB, text(1))
    wait_tenant_entries("bob", 1)
    for body in ({"all_tenants": True}, {"tenant": "bob"}):
        r = hardened.post("/v1/cache/clear", json=body, headers=auth(ALICE))
        is_json_error(r, 403, "permission_error")
    admin = hardened.get("/v1/cache/stats", headers=auth(H_ADMIN)).json()
    assert admin["admin"] is True and admin["tenants"]["bob"]["entries"] >= 1
    assert admin["ingress"]["forbidden"] >= 2 and admin["ingress"]["auth_failures"] >= 1
    r = hardened.post("/v1/cache/clear", json={"tenant": "bob"}, headers=auth(H_ADMIN))
    assert r.status_code == 200 and r.json()["tenant"] == "bob" and r.json()["cleared"] >= 1
    own = hardened.post("/v1/cache/clear", headers=auth(ALICE))
    assert own.status_code == 200 and own.json()["tenant"] == "alice"
    r = hardened.post("/v1/cache/clear", json={"all_tenants": True}, headers=auth(H_ADMIN))
    assert r.status_code == 200 and r.json()["tenant"] == "*"


def test_tenant_quota_on_entries(hardened):
    for i in range(4):
        assert gen(hardened, CAROL, text(10 + i)).status_code == 200
    import ray

    actor = ray.get_actor(H_INDEX, namespace=INDEX_NS)
    wait_tenant_entries("carol", 2)
    time.sleep(1.0)  # let the last registrations land
    st = ray.get(actor.stats.remote())
    assert st["tenants"]["carol"]["entries"] == 2  # tenant_max_items
    assert st["evictions"] >= 2


# limits ----------------------------------------------------------------------------------

def test_body_limit_applies_to_the_bytes_received(hardened):
    big = json.dumps({"prompt": "x" * 5000}).encode()
    r = hardened.post("/v1/generate", content=big, headers={**auth(ALICE), "content-type": "application/json"})
    assert is_json_error(r, 413)["code"] == "body_too_large"

    def chunks(data: bytes):  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(data), 512):
            yield data[i:i + 512]

    r = hardened.post("/v1/generate", content=chunks(big),
                      headers={**auth(ALICE), "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert is_json_error(r, 413)["code"] == "body_too_large"
    small = json.dumps({"prompt": text(2, 200), "max_new_tokens": 1, "temperature": 0}).encode()
    r = hardened.post("/v1/generate", content=chunks(small),
                      headers={**auth(ALICE), "content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_token_limits(hardened):
    is_json_error(gen(hardened, ALICE, "hello there", max_new_tokens=49), 400)
    r = hardened.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1000}, headers=auth(ALICE))
    is_json_error(r, 400)
    long_prompt = " ".join(_CORPUS[50000:53500].split())  # > 256 tiny-BPE tokens, < 4 KiB
    err = is_json_error(gen(hardened, ALICE, long_prompt), 400)
    assert err["type"] == "context_length_exceeded"


def test_request_timeout_non_stream_is_a_json_504(hardened):
    t0 = time.time()
    r = gen(hardened, ALICE, text(3), max_new_tokens=48, use_semshare=False)  # 48 x 0.1 s > 4 s
    assert is_json_error(r, 504, "timeout")["code"] == "request_timeout"
    assert time.time() - t0 < 10


def test_request_timeout_ends_a_stream_cleanly(hardened):
    t0 = time.time()
    r = hardened.post("/v1/completions", json={"prompt": text(4), "max_tokens": 48, "temperature": 0,
                                               "stream": True, "use_semshare": False}, headers=auth(ALICE))
    assert r.status_code == 200
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "timeout", events[-3:]
    assert any(e != "[DONE]" and "choices" in e for e in events)  # some text came first
    assert time.time() - t0 < 10


def test_admission_limit_is_a_json_503_with_retry_after(hardened):
    def one(i):
        with httpx.Client(base_url=str(hardened.base_url), timeout=60) as c:
            return c.post("/v1/generate", json={"prompt": f"req {i} " + text(5, 150), "max_new_tokens": 10,
                                                "use_semshare": False}, headers=auth(ALICE))

    with ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(one, range(12)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for r in rs:
        if r.status_code == 503:
            assert is_json_error(r, 503, "overloaded")
            assert r.headers["retry-after"] == "2"


# faults ----------------------------------------------------------------------------------

def test_replica_killed_mid_stream(hardened):
    """The stream ends with an error event + [DONE] (no hang); other requests keep working."""
    import ray

    body = {"prompt": text(6), "max_tokens": 20, "temperature": 0, "stream": True, "use_semshare": False}
    others: list[int] = []
    stop = threading.Event()

    def background():  # other traffic while the replica dies: 200, or a retryable JSON 503
        with httpx.Client(base_url=str(hardened.base_url), timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", json={"prompt": text(7, 120), "max_new_tokens": 1,
                                                 "use_semshare": False}, headers=auth(BOB))
                others.append(r.status_code)
                if r.status_code != 200:
                    assert r.json()["error"]["type"] in ("service_unavailable", "overloaded"), r.text
                time.sleep(0.1)

    t0 = time.time()
    with hardened.stream("POST", "/v1/completions", json=body, headers=auth(ALICE)) as r:
        assert r.status_code == 200
        replica = r.headers["x-semshare-replica"]
        it = r.iter_lines()
        got = [next(it) for _ in range(3)]  # the stream is running
        assert any(line.startswith("data: ") for line in got)
        bg = threading.Thread(target=background, daemon=True)
        bg.start()
        victim = ray.get_actor(f"SERVE_REPLICA::hardened#SemShareServer#{replica}", namespace="serve")
        ray.kill(victim, no_restart=True)
        rest = "\n".join(got) + "\n" + "\n".join(it)
    elapsed = time.time() - t0
    events = sse(rest)
    assert events[-1] == "[DONE]"
    last = events[-2]
    # either the kill won (an in-band error) or the stream had just finished
    if "error" in last:
        assert last["error"]["type"] in ("service_unavailable", "internal_error"), last
    else:
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
    assert elapsed < 15
    # other requests: served by the surviving replica; the app recovers
    deadline = time.time() + 90
    while True:
        r = gen(hardened, BOB, text(8, 150), max_new_tokens=1)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        assert time.time() < deadline, "no replica answered after the kill"
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    bg.join(timeout=60)
    assert others and 500 not in others and 200 in others, others
    admin = hardened.get("/v1/cache/stats", headers=auth(H_ADMIN)).json()
    ing = admin["ingress"]
    print("\nreplica kill: stream last event", last, "other requests", others, "ingress counters", ing)
    assert ing["replica_failures"] + ing["stream_errors"] >= (1 if "error" in last else 0)
