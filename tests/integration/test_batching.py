"""Continuous batching through Serve: concurrent requests share decode steps, answers
equal the one-at-a-time answers, a disconnect frees the request's slot and KV."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from test_serve_app import passage


def _replica_infos(app: str = "semshare", timeout: float = 30.0) -> dict:
    """``info()`` of every model replica (the handle picks replicas at random: ask until both answered)."""
    from ray import serve

    h = serve.get_deployment_handle("SemShareServer", app_name=app)
    seen: dict = {}
    deadline = time.time() + timeout
    while len(seen) < 2 and time.time() < deadline:
        info = h.info.remote().result(timeout_s=30)
        seen[info["replica"]] = info
    return seen


def test_concurrent_requests_are_batched_and_equal_sequential_answers(server):
    prompts = [f"question {i}: " + passage(40 + i, 200) for i in range(8)]
    body = {"max_new_tokens": 24, "temperature": 0, "use_semshare": False}
    alone = [server.gen(p, **body)["text"] for p in prompts[:3]]
    before = {r: i["scheduler"]["steps"] for r, i in _replica_infos().items()}

    def one(p: str) -> dict:
        with httpx.Client(base_url=server.base, timeout=120) as c:
            r = c.post("/v1/generate", json={"prompt": p, **body})
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, prompts))
    assert [t["text"] for t in together[:3]] == alone  # greedy: the batch changes nothing
    assert all(t["usage"]["completion_tokens"] == 24 or t["finish_reason"] == "stop" for t in together)
    infos = _replica_infos()
    decoded = sum(i["scheduler"]["decoded_tokens"] for i in infos.values())
    steps = sum(i["scheduler"]["steps"] - before.get(r, 0) for r, i in infos.items())
    assert decoded > 0 and steps > 0
    # 8 requests x 23 decode steps each on 2 replicas: far fewer steps than tokens when batched
    assert steps < 8 * 23, (steps, infos)


def test_disconnect_mid_stream_frees_the_slot_and_kv(hardened):
    """The hardened app decodes slowly (0.1 s per step): the request is still running when the client leaves."""
    from conftest import H_ADMIN

    body = {"prompt": "disconnect me " + passage(50, 150), "max_tokens": 40, "temperature": 0, "stream": True,
            "use_semshare": False}
    before = sum(i["scheduler"]["cancelled"] for i in _replica_infos("hardened").values())
    with httpx.Client(base_url=str(hardened.base_url), timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {H_ADMIN}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                if got >= 3:
                    break  # leave with the request still decoding
    deadline = time.time() + 30
    while True:
        infos = _replica_infos("hardened")
        sched = [i["scheduler"] for i in infos.values()]
        if all(s["running"] == 0 and s["prefilling"] == 0 and s["kv_bytes"] == 0 and s["reserved_bytes"] == 0
               for s in sched) and sum(s["cancelled"] for s in sched) > before:
            break
        assert time.time() < deadline, sched
        time.sleep(0.3)


def test_replicas_start_with_torch_huge_pages(server):
    """``huge_pages`` (default on) reaches the replica's process env before torch's first allocation."""
    infos = _replica_infos()
    assert infos and all(i["huge_pages"] for i in infos.values())
