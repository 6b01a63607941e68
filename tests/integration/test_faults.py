"""Faults between the index and the replicas (main app, open mode): an object lost
after the lookup, corrupted / truncated / foreign KV at rest, entries evicted while
borrowed, and an index under byte pressure. Each is a full prefill for the request,
never an error, and each is counted."""
from __future__ import annotations

import time

import numpy as np
import pytest

from semshare_core.models import corpus_text

pytestmark = pytest.mark.ray

_CORPUS = corpus_text()
TENANT = "faults"


def text(i: int, chars: int = 600) -> str:
    start = 120000 + i * 6000
    return " ".join(_CORPUS[start:start + chars].split())


def gen(server, prompt: str, **kw) -> dict:
    r = server.http.post("/v1/generate", json={"prompt": prompt, "temperature": 0, "max_new_tokens": 4, **kw},
                         headers={"X-Tenant": TENANT})
    assert r.status_code == 200, r.text
    return r.json()


def wait_key(server, key: str, present: bool = True, timeout: float = 30) -> None:
    import ray

    deadline = time.time() + timeout
    while (key in [e["key"] for e in ray.get(server.index_actor().entries.remote())]) != present:
        assert time.time() < deadline, f"{key} never {'appeared' if present else 'went away'}"
        time.sleep(0.2)


@pytest.mark.parametrize("kind,reason,counter", [
    ("lose", "lost_objects", "lost_objects"),
    ("truncate", "kv_corrupt", "corrupt_objects"),
    ("corrupt_bytes", "kv_corrupt", "corrupt_objects"),
    ("truncate_bytes", "kv_corrupt", "corrupt_objects"),
    ("foreign", "kv_mismatch", "mismatched_objects"),
    ("nan_logits", "kv_corrupt", "corrupt_objects"),
])
def test_damaged_reference_is_a_full_prefill(server, kind, reason, counter):
    import ray

    i = ["lose", "truncate", "corrupt_bytes", "truncate_bytes", "foreign", "nan_logits"].index(kind)
    p = text(i)
    key = f"fault-{kind}"
    first = gen(server, p, store_key=key)
    wait_key(server, f"{TENANT}:{key}")
    actor = server.index_actor()
    before = ray.get(actor.stats.remote())
    assert ray.get(actor.inject_fault.remote(f"{TENANT}:{key}", kind)) is True
    r = gen(server, p)
    if kind == "lose" and r["fallback"] == "kv_corrupt":
        # on one node the dead owner's object can still be read from the local store: the
        # replica then gets the stand-in array, which the reference check rejects
        reason, counter = "kv_corrupt", "corrupt_objects"
    assert r["cache_hit"] is False and r["fallback"] == reason, r
    assert r["usage"]["reused_tokens"] == 0
    assert r["text"] == first["text"]  # the full prefill answers exactly as before
    wait_key(server, f"{TENANT}:{key}", present=False)  # reported and dropped
    after = ray.get(actor.stats.remote())
    assert after[counter] == before[counter] + 1
    # the prompt registered again on that request: reuse works again
    deadline = time.time() + 30
    while not (again := gen(server, p))["cache_hit"]:
        assert time.time() < deadline
        time.sleep(0.3)
    assert again["fallback"] is None and again["text"] == first["text"]


def test_entry_evicted_while_borrowed_still_serves_the_borrower(server):
    """Lookup hands out a ref; clearing / evicting the entry right after does not pull the
    object from under the borrower (the actor dropped its ref, the borrower holds one)."""
    import ray

    p = text(7)
    gen(server, p, store_key="borrowed")
    wait_key(server, f"{TENANT}:borrowed")
    from semshare_core import SemShareEngine
    from semshare_core.models import tiny_random

    lm = tiny_random("llama")
    eng = SemShareEngine(lm.model, lm.tokenizer)
    ids = eng.encode(p)
    actor = server.index_actor()
    hit = ray.get(actor.lookup.remote(eng.fingerprint(ids), TENANT, 0.3))
    assert hit is not None and hit.key == f"{TENANT}:borrowed"
    assert ray.get(actor.clear.remote(TENANT)) >= 1
    packed = ray.get(hit.refs[0], timeout=30)
    assert packed.seq_len == ids.size
    pre = eng.prefill(ids, packed)
    assert pre.stats.hit and pre.stats.reused_tokens > 0


def _fake_kv(seq: int, sig):
    from semshare_core import PackedKV

    data = np.zeros((sig.num_layers, 2, sig.num_kv_heads, seq, sig.head_dim), dtype=np.float32)
    return PackedKV(data, "float32", np.arange(seq, dtype=np.int64) % sig.vocab_size, sig)


def test_index_under_byte_pressure_evicts_and_never_exceeds_the_cap(server):
    """Many large registrations into a capped index: bytes stay under the cap, the evicted
    objects are freed, nothing crashes; an entry over the cap is refused."""
    import ray

    from semshare_core.kv import ModelSignature
    from serve_app.index_actor import get_or_create_index_actor

    sig = ModelSignature("X", 4, 4, 16, 64, 512, "{}", "0" * 16)
    per = _fake_kv(1024, sig).nbytes  # ~1 MiB
    cap = 6 * per + per // 2
    actor = get_or_create_index_actor("pressure", "semshare_it", 64, max_items=1000, max_bytes=cap, detached=False)
    rng = np.random.default_rng(0)
    try:
        outs = []
        for wave in range(6):  # 60 x 1 MiB through a 6.5 MiB cap, 10 in flight at a time
            futs = []
            for j in range(10):
                v = rng.standard_normal(64).astype(np.float32)
                futs.append(actor.register.remote(f"p:{wave}-{j}", v / np.linalg.norm(v), np.arange(1024),
                                                  _fake_kv(1024, sig), "p"))
            outs += ray.get(futs)
            st = ray.get(actor.stats.remote())
            assert st["bytes"] <= cap and st["entries"] <= 6
        assert all(o["stored"] for o in outs)
        st = ray.get(actor.stats.remote())
        assert st["evictions"] == 60 - st["entries"] and st["bytes"] <= cap
        audit = ray.get(actor.audit.remote())
        assert audit["lost"] == [] and audit["sum_object_nbytes"] == st["bytes"]
        big = ray.get(actor.register.remote("p:big", v, np.arange(8192), _fake_kv(8192, sig), "p"))
        assert big["stored"] is False and ray.get(actor.stats.remote())["rejected"] == 1
        print(f"\nbyte pressure: 60 x {per} B into a {cap} B cap -> {st['entries']} entries, {st['bytes']} B, "
              f"{st['evictions']} evictions, 1 rejected")
    finally:
        ray.kill(actor)
