"""Bounded load on loopback: 200 requests from 16 concurrent clients against the two
replicas, a mix of repeated, similar and unrelated prompts. Every request gets an
answer, none is a 5xx; hit rate and latency percentiles are printed, not asserted."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from semshare_core.models import corpus_text

pytestmark = pytest.mark.ray

_CORPUS = corpus_text()
N_REQUESTS, CLIENTS = 200, 16


def base(i: int) -> str:
    start = (200000 + i * 5000) % (len(_CORPUS) - 1000)
    return " ".join(_CORPUS[start:start + 320].split())


def similar(text: str, rng: random.Random) -> str:
    words = text.split()
    k = rng.randrange(len(words) // 3, 2 * len(words) // 3)
    words[k:k + 4] = ["a", "small", "edit", "here"]
    return " ".join(words)


def test_load_mix(server):
    rng = random.Random(7)
    bases = [base(i) for i in range(8)]
    prompts = []
    for i in range(N_REQUESTS):
        r = rng.random()
        if r < 0.4:
            prompts.append(("repeated", rng.choice(bases)))
        elif r < 0.75:
            prompts.append(("similar", similar(rng.choice(bases), rng)))
        else:
            prompts.append(("unrelated", base(100 + i)))

    def one(item):
        kind, prompt = item
        with httpx.Client(base_url=server.base, timeout=120) as c:
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 2, "temperature": 0},
                           headers={"X-Tenant": "load"})
            except httpx.HTTPError as e:  # a lost request
                return kind, None, repr(e), time.perf_counter() - t0
            return kind, r.status_code, r.json(), time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    codes = [c for _, c, _, _ in results]
    assert len(results) == N_REQUESTS and None not in codes, [r for r in results if r[1] is None][:3]
    assert not [c for c in codes if c >= 500], [(k, c, b) for k, c, b, _ in results if c >= 500][:5]
    ok = [(k, b, dt) for k, c, b, dt in results if c == 200]
    lat = sorted(dt for _, _, dt in ok)
    hits = sum(b["cache_hit"] for _, b, _ in ok)
    by_kind = {k: (sum(b["cache_hit"] for kk, b, _ in ok if kk == k), sum(1 for kk, _, _ in ok if kk == k))
               for k in ("repeated", "similar", "unrelated")}
    replicas = {b["replica"] for _, b, _ in ok}
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3  # noqa: E731
    st = server.index_stats()
    print(f"\nload: {N_REQUESTS} requests, {CLIENTS} clients, {wall:.1f}s wall, {len(ok)} x 200, "
          f"non-200 {sorted(set(c for c in codes if c != 200)) or 'none'}; hit rate {hits / max(1, len(ok)):.2f} "
          f"(repeated {by_kind['repeated']}, similar {by_kind['similar']}, unrelated {by_kind['unrelated']}); "
          f"p50 {pct(0.50):.0f} ms, p99 {pct(0.99):.0f} ms; replicas {len(replicas)}; "
          f"index {st['entries']} entries, {st['bytes']} B of {st['max_bytes']}, {st['evictions']} evictions")
    assert set(codes) <= {200, 503}  # 503 only if shed (JSON, Retry-After); none expected at 16 clients
    assert st["bytes"] <= st["max_bytes"]
    assert len(replicas) == 2
