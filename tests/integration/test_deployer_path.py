"""The deployer's path through Serve (issue 16): a model replica warms up before Serve
counts it running, and ``index_max_bytes`` bounds the object store even when another
replica fetched the evicted entries into its hot tier.

Two small apps of one model replica each (no ingress: requests go through deployment
handles, untokenized, so the replica tokenizes and looks up itself) share one index
actor of 2 items: ``dp-a`` (warm-up on, the default) registers entries, ``dp-b``
(``warmup: false``) fetches them cold.
"""
from __future__ import annotations

import time

import pytest

from test_serve_app import passage

pytestmark = pytest.mark.ray

DP_INDEX, DP_NS = "semshare_index_dp", "semshare_dp"
DP_ARGS = {"preset": "tiny-random", "num_replicas": 1, "num_cpus": 0.1, "index_name": DP_INDEX,
           "index_namespace": DP_NS, "index_max_items": 2, "hot_tier_bytes": 64 << 20, "affinity": False,
           "max_prompt_tokens": 1024, "api_keys_env": None, "admin_keys_env": None}


def _deploy(name: str, **over):
    from ray import serve

    from serve_app.app import model_deployment_options
    from serve_app.llm_server import SemShareServer
    from serve_app.settings import resolve_args

    a = resolve_args({**DP_ARGS, **over})
    app = SemShareServer.options(**model_deployment_options(a)).bind(a.model_dump())
    return serve.run(app, name=name, route_prefix=None)


@pytest.fixture(scope="module")
def dp(server):
    import ray
    from ray import serve

    a, b = _deploy("dp-a", kv_owner="node"), _deploy("dp-b", warmup=False)
    try:
        yield a, b
    finally:
        for name in ("dp-a", "dp-b"):
            serve.delete(name)
        try:
            ray.kill(ray.get_actor(DP_INDEX, namespace=DP_NS), no_restart=True)
        except ValueError:
            pass
        from serve_app.kv_owner import kill_kv_owners

        kill_kv_owners(DP_INDEX, DP_NS)


def _index():
    import ray

    return ray.get_actor(DP_INDEX, namespace=DP_NS)


def _index_stats() -> dict:
    import ray

    return ray.get(_index().stats.remote(), timeout=30)


def _index_keys() -> list[str]:
    import ray

    return sorted(e["key"] for e in ray.get(_index().entries.remote(), timeout=30))


def _gen(handle, prompt: str, store_key: str | None = None) -> dict:
    """One greedy request of 4 tokens through ``handle``; its ``done`` event."""
    from serve_app.protocol import ReplicaRequest, Sampling

    req = ReplicaRequest("dp", Sampling(4, 0.0, 1.0), prompt=prompt, store_key=store_key)
    events = list(handle.options(stream=True).generate.remote(req))
    assert events and events[-1]["type"] == "done", events
    return events[-1]


def _hot(handle) -> dict:
    return handle.info.remote().result(timeout_s=30)["reuse"]["hot"]


def _store_used() -> int:
    """Bytes of objects in this (single) node's object store, from the raylet."""
    import ray
    from ray._private.internal_api import node_stats

    node = next(n for n in ray.nodes() if n["Alive"])
    reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
    return int(reply.store_stats.object_store_bytes_used)


def _wait_store_at_most(limit: int, timeout: float = 30.0) -> int:
    """Poll until the object store holds at most ``limit`` bytes (frees are asynchronous:
    the owner learns of released borrows, then the raylet unpins); the last reading."""
    deadline = time.time() + timeout
    while True:
        used = _store_used()
        if used <= limit or time.time() > deadline:
            return used
        time.sleep(0.3)


def test_a_replica_warms_up_before_it_runs_and_leaves_no_trace(dp):
    """``serve.run`` returns once the replica is RUNNING, i.e. after its constructor, which
    warmed up: the replica reports the warm-up, and nothing of it is in the index, the hot
    tier or the counters."""
    a, _ = dp
    info = a.info.remote().result(timeout_s=60)
    w = info["warmup"]
    assert w["ran"] is True and w["hit"] is True and w["decode_steps"] == 2 and w["prompt_tokens"] >= 16, w
    assert 0 < w["ms"] < 10_000, w  # ~40 ms for this model on an idle core
    assert w["compile_s"] is None and info["compile_decode"] == {"mode": "auto", "active": False}  # fp32: eager
    assert w["compile_prefill_s"] is None and info["compile_prefill"] == {"mode": "auto", "active": False}
    assert info["scheduler"]["steps"] == 0 and info["scheduler"]["submitted"] == 0, info["scheduler"]
    assert not any(v for k, v in info["counters"].items()), info["counters"]
    assert info["reuse"]["hot"]["entries"] == 0 and info["reuse"]["registered"] == 0
    st = _index_stats()
    assert st["entries"] == 0 and st["registered"] == 0 and st["bytes"] == 0, st


def test_a_non_streaming_request_gets_its_first_token_and_the_done_only(dp):
    """``stream=False`` (what the ingress sets for a non-streaming response): the replica
    sends the first token and then only the ``done`` event, whose text and usage are those
    of the same request streamed token by token."""
    from serve_app.protocol import ReplicaRequest, Sampling

    _, b = dp
    prompt = passage(3)[:300]
    runs = {}
    for stream in (True, False):
        req = ReplicaRequest("dp", Sampling(8, 0.0, 1.0, stop_on_eos=False), prompt=prompt, use_semshare=False,
                             stream=stream)
        runs[stream] = list(b.options(stream=True).generate.remote(req))
    streamed, quiet = runs[True], runs[False]
    assert [e["type"] for e in quiet] == ["token", "done"], quiet
    # a token event carries every token the engine made since the last one (``ids``), so
    # count tokens, not events: the streamed run sent all 8
    streamed_ids = [t for e in streamed if e["type"] == "token" for t in e.get("ids", [])]
    assert len(streamed_ids) == 8, streamed
    assert quiet[-1]["text"] == streamed[-1]["text"] and quiet[-1]["usage"] == streamed[-1]["usage"]
    assert quiet[-1]["usage"]["completion_tokens"] == 8
    assert quiet[0]["ids"][0] == streamed_ids[0]  # the first event starts with the same first token


def test_warmup_false_runs_no_warm_up(dp):
    _, b = dp
    info = b.info.remote().result(timeout_s=60)
    assert info["warmup"] == {"ran": False}


def test_evicted_entries_leave_the_object_store_though_a_replica_fetched_them(dp):
    """``index_max_bytes`` / ``index_max_items`` bound the object store.

    dp-a registers e0, e1; dp-b fetches both cold (zero-copy from the object store) and
    keeps them hot; dp-a registers e2, e3, and the index (2 items) evicts e0, e1.
    Observable: the raylet's own count of bytes in this node's object store
    (``GetNodeStats``: ``store_stats.object_store_bytes_used``), compared with a reading
    taken before any entry existed. Any live numpy view into an object (its KV, even
    its token ids alone) keeps the whole object pinned there, so a hot tier holding
    views would keep e0 and e1 (about ``held`` bytes) in the store after the index
    dropped them; with private hot copies the store holds only what the index holds.
    Then dp-a registers e0 again (a new version): dp-b's next request for it drops its
    stale hot copy. Last, clearing the index empties the store of its entries."""
    a, b = dp
    assert _index_stats()["entries"] == 0
    base = _store_used()
    prompts = [passage(20 + i, 600) for i in range(4)]
    for i in (0, 1):
        assert _gen(a, prompts[i], f"e{i}")["store_key"] == f"e{i}"
    held = _index_stats()["bytes"]
    assert held > 100_000
    # dp-a (kv_owner: node): the KV went to this node's owner actor, only its ref to the
    # index (no fallback); dp-b (auto) shares the node with the index: the index puts
    import ray

    from serve_app.kv_owner import owner_name

    owner = ray.get_actor(owner_name(DP_INDEX, ray.get_runtime_context().get_node_id()), namespace=DP_NS)
    assert ray.get(owner.node_id.remote(), timeout=30) == ray.get_runtime_context().get_node_id()
    reuse = a.info.remote().result(timeout_s=30)["reuse"]
    assert reuse["kv_owner"] == "node" and reuse["registered"] == 2 and reuse["kv_owner_errors"] == 0, reuse
    assert b.info.remote().result(timeout_s=30)["reuse"]["kv_owner"] == "index"
    for i in (0, 1):
        done = _gen(b, prompts[i])
        assert done["cache_hit"] and done["cache_tier"] == "cold" and done["ref_key"] == f"e{i}", done
        assert done["store_key"] == f"e{i}"  # the same prompt: nothing new registered
    deadline = time.time() + 30
    while _hot(b)["entries"] < 2:  # admission runs off the request's path
        assert time.time() < deadline, _hot(b)
        time.sleep(0.2)

    for i in (2, 3):
        assert _gen(a, prompts[i], f"e{i}")["store_key"] == f"e{i}"
    st = _index_stats()
    assert st["entries"] == 2 and st["evictions"] >= 2, st
    assert _index_keys() == ["dp:e2", "dp:e3"]
    used = _wait_store_at_most(base + st["bytes"] + held // 2)
    assert used - base <= st["bytes"] + held // 2, (used - base, st["bytes"], held)

    # e0 registered again (new version): dp-b's lookup returns it, the old hot copy goes
    assert _gen(a, prompts[0], "e0")["store_key"] == "e0"
    before = _hot(b)
    done = _gen(b, prompts[0])
    assert done["cache_hit"] and done["cache_tier"] == "cold", done
    deadline = time.time() + 30
    while (after := _hot(b))["inserts"] <= before["inserts"]:
        assert time.time() < deadline, after
        time.sleep(0.2)
    assert after["entries"] == 2 and after["dropped"] == before["dropped"] + 1, (before, after)

    assert ray.get(_index().clear.remote(), timeout=30) == 2
    used = _wait_store_at_most(base + held // 4)
    assert used - base <= held // 4, (used - base, held)
