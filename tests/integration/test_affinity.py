"""Hot tier, cache-affinity routing, read-your-writes and chains of reuse, end to end.

A third app in the session's Serve instance, at /a: 2 tiny-random replicas, a slow
decode (fault injection) so a replica can be kept busy, an imbalance threshold of 1,
and a reuse depth cap of 2.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from semshare_core.models import corpus_text

pytestmark = pytest.mark.ray

_CORPUS = corpus_text()
A_INDEX = "semshare_index_aff"
A_ARGS = {
    "preset": "tiny-random",
    "num_replicas": 2,
    "num_cpus": 0.15,
    "ingress_num_cpus": 0.05,
    "index_name": A_INDEX,
    "index_namespace": "semshare_it",
    "index_max_items": 64,
    "index_max_bytes": 16 << 20,
    "max_prompt_tokens": 1024,
    "max_new_tokens": 64,
    "max_ongoing_requests": 4,
    "fault_decode_delay_s": 0.05,
    "affinity_imbalance_threshold": 1,
    "max_reuse_depth": 2,
    "depth_cap_policy": "skip",  # the chain test checks skip; refresh is the explicit-store_key path below
    "api_keys_env": None,
    "admin_keys_env": None,
}


def passage(i: int, chars: int = 900) -> str:
    start = 260000 + i * 7000
    return " ".join(_CORPUS[start:start + chars].split())


def edit_region(text: str, region: int, share: float = 0.1) -> str:
    """Replace the ``region``-th stretch of ``share`` of the words (a new edit per link)."""
    words = text.split()
    k = max(2, int(len(words) * share))
    s = min(len(words) - k, region * k)
    return " ".join(words[:s] + [f"edit{region} words of mine here"] * (k // 5 + 1) + words[s + k:])


@pytest.fixture(scope="module")
def aff(server):
    import ray
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(A_ARGS), name="affinity", route_prefix="/a")
    client = httpx.Client(base_url=server.base + "/a", timeout=120)
    deadline = time.time() + 90
    while client.get("/health").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.5)
    try:
        yield client
    finally:
        client.close()
        serve.delete("affinity")
        try:
            ray.kill(ray.get_actor(A_INDEX, namespace="semshare_it"))
        except ValueError:
            pass


def gen(client, prompt: str, tenant: str, **kw) -> dict:
    r = client.post("/v1/generate", json={"prompt": prompt, "temperature": 0, "max_new_tokens": 2, **kw},
                    headers={"X-Tenant": tenant})
    assert r.status_code == 200, r.text
    return r.json()


def entries(tenant: str) -> dict:
    import ray

    es = ray.get(ray.get_actor(A_INDEX, namespace="semshare_it").entries.remote(), timeout=30)
    return {e["key"].split(":", 1)[1]: e for e in es if e["tenant"] == tenant}


def test_store_key_is_found_by_the_very_next_request(server):
    """Read-your-writes: no polling. The entry is in the index when the response arrives."""
    import ray

    p = passage(0)
    for i in range(3):
        q = edit_region(p, i, 0.05)
        r = server.gen(q, temperature=0, max_new_tokens=1, store_key=f"ryw-{i}", use_semshare=True,
                       sim_threshold=0.9999)  # no reuse: every one is a fresh full prefill
        assert r["store_key"] == f"ryw-{i}" and r["cache_hit"] is False
        keys = [e["key"] for e in ray.get(server.index_actor().entries.remote())]
        assert f"default:ryw-{i}" in keys, keys
        again = server.gen(q, temperature=0, max_new_tokens=1)
        assert again["cache_hit"] is True and again["ref_key"] == f"ryw-{i}", again
    # a generated key too
    r = server.gen(passage(1), temperature=0, max_new_tokens=1)
    assert r["store_key"] and r["timing"]["register_wait_ms"] >= 0
    assert f"default:{r['store_key']}" in [e["key"] for e in ray.get(server.index_actor().entries.remote())]


def test_saturated_holder_sends_the_variant_elsewhere_as_a_cold_hit(aff):
    tenant = "sat"
    p = passage(2)
    first = gen(aff, p, tenant, store_key="src")
    holder = first["replica"]
    assert entries(tenant)["src"]["hot"] == [holder]
    # two slow hot-routed requests occupy the holder (queue 2 vs 0 > threshold 1)
    out: list = []

    def slow():
        out.append(gen(aff, p, tenant, max_new_tokens=50))
    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    time.sleep(0.5)
    var = gen(aff, edit_region(p, 3), tenant)
    for t in threads:
        t.join(timeout=60)
    assert [o["replica"] for o in out] == [holder, holder], out
    assert all(o["cache_tier"] == "hot" for o in out)
    assert var["replica"] != holder, var
    assert var["cache_hit"] is True and var["cache_tier"] == "cold" and var["ref_key"] == "src", var
    assert var["timing"]["kv_fetch_ms"] > 0
    # the other replica now holds src hot as well (fetch fills the hot tier)
    deadline = time.time() + 10
    while sorted(entries(tenant)["src"]["hot"]) != sorted([holder, var["replica"]]):
        assert time.time() < deadline, entries(tenant)["src"]
        time.sleep(0.1)
    # idle again: the variant's own entry is hot on the replica that registered it
    again = gen(aff, edit_region(p, 3), tenant)
    assert again["cache_tier"] == "hot" and again["replica"] == var["replica"], again


def test_depth_cap_along_a_chain_of_five_variants(aff):
    tenant = "chain"
    chain = [passage(4)]
    for i in range(1, 5):
        chain.append(edit_region(chain[-1], i * 2))
    got = [gen(aff, chain[0], tenant, store_key="v0")]
    for i in range(1, 5):
        got.append(gen(aff, chain[i], tenant))
    depths = [g["depth"] for g in got]
    refs = [g["ref_key"] for g in got]
    # v1 reuses v0 (exact), v2 reuses v1 (depth 1); v3 would be depth 3 > cap 2: not registered
    assert depths[:3] == [0, 1, 2], (depths, refs)
    assert refs[1] == "v0" and refs[2] == got[1]["store_key"], refs
    assert got[3]["cache_hit"] and got[3]["ref_depth"] == 2 and got[3]["store_key"] is None and depths[3] is None
    es = entries(tenant)
    assert all(e["depth"] <= 2 for e in es.values()) and es["v0"]["exact"] and not es[got[1]["store_key"]]["exact"]
    # v4 cannot reuse v3 (never registered): it reuses the closest registered link instead
    assert got[4]["cache_hit"] and got[4]["ref_key"] in {g["store_key"] for g in got[:3]}
    assert all((g["depth"] or 0) <= 2 for g in got)
    # past the cap, an explicit store_key registers an exact prefill (depth 0) instead
    r = gen(aff, chain[3], tenant, store_key="v3-exact")
    assert r["cache_hit"] and r["depth"] == 0, r
    e = entries(tenant)["v3-exact"]
    assert e["depth"] == 0 and e["exact"] is True
    # and the next variant prefers that exact entry
    nxt = gen(aff, edit_region(chain[3], 9), tenant)
    assert nxt["ref_key"] == "v3-exact" and nxt["depth"] == 1, nxt


def test_killed_holder_entries_served_cold_and_no_request_fails(aff):
    import ray

    tenant = "kill"
    p = passage(6)
    first = gen(aff, p, tenant, store_key="orphan")
    holder = first["replica"]
    assert entries(tenant)["orphan"]["hot"] == [holder]
    victim = ray.get_actor(f"SERVE_REPLICA::affinity#SemShareServer#{holder}", namespace="serve")
    ray.kill(victim, no_restart=True)

    def one(i: int) -> dict:
        with httpx.Client(base_url=str(aff.base_url), timeout=120) as c:
            r = c.post("/v1/generate", json={"prompt": edit_region(p, i % 4), "temperature": 0,
                                             "max_new_tokens": 2}, headers={"X-Tenant": tenant})
            return {"status": r.status_code, **(r.json() if r.status_code == 200 else {"body": r.text})}

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(6)))
    assert [r["status"] for r in results] == [200] * 6, results
    assert all(r["replica"] != holder for r in results)
    assert all(r["cache_hit"] for r in results), results
    assert any(r["cache_tier"] == "cold" and r["ref_key"] == "orphan" for r in results), results
    # the index learns the holder died (the router reports replicas leaving its set): the
    # entry stays, no longer listing the dead replica as a hot holder
    index = ray.get_actor(A_INDEX, namespace="semshare_it")
    deadline = time.time() + 60
    while holder in entries(tenant)["orphan"]["hot"]:
        assert time.time() < deadline, (holder, entries(tenant)["orphan"], ray.get(index.stats.remote()))
        time.sleep(0.2)
    st = ray.get(index.stats.remote(), timeout=30)
    assert st["dead_holders"] >= 1 and st["dropped_hot"] >= 1, st
    assert all(holder not in e["hot"] for e in entries(tenant).values())
    # the same prompt again: a hit on the surviving entry, never routed to the dead replica
    again = gen(aff, p, tenant)
    assert again["cache_hit"] is True and again["ref_key"] == "orphan" and again["replica"] != holder, again
    # the app comes back to 2 replicas (Serve replaces the dead one)
    deadline = time.time() + 120
    while True:
        st = ray.get(ray.get_actor(A_INDEX, namespace="semshare_it").ping.remote())
        if st["ok"]:
            break
        assert time.time() < deadline
