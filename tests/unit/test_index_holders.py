"""KVIndex's hot-holder bookkeeping: dead replicas leave every entry's ``hot`` (no Ray needed)."""
from __future__ import annotations

import numpy as np


def vec(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def make_index():
    from serve_app.index_actor import EntryMeta, KVIndex

    kv = KVIndex(16, max_items=10, max_bytes=10**6)
    for i, hot in enumerate([{"r1", "r2"}, {"r1"}, {"r3"}, set()]):
        key = f"t:k{i}"
        kv.index.add(key, vec(i), np.arange(4), 100, f"ref{i}", tenant="t")  # payload: a stand-in for the ref
        kv.meta[key] = EntryMeta(f"uid{i}", hot=set(hot))
    return kv


def hot(kv) -> dict:
    return {e["key"]: e["hot"] for e in kv.entries()}


def test_drop_holders_removes_dead_replicas_everywhere_and_keeps_the_entries():
    kv = make_index()
    assert kv.drop_holders(["r1", "gone-never-listed"]) == 2
    assert hot(kv) == {"t:k0": ["r2"], "t:k1": [], "t:k2": ["r3"], "t:k3": []}
    st = kv.stats()
    assert st["entries"] == 4 and st["dead_holders"] == 2 and st["dropped_hot"] == 2
    # idempotent: several routers may report the same death
    assert kv.drop_holders(["r1"]) == 0 and kv.stats()["dead_holders"] == 2
    assert kv.drop_holders([]) == 0 and kv.drop_replica("r3") == 1
    assert hot(kv)["t:k2"] == [] and kv.stats()["dead_holders"] == 3
    # a lookup still finds the entry (served cold), with no hot holder listed
    res = kv.lookup(vec(1), tenant="t", threshold=0.9)
    assert res.key == "t:k1" and res.hot == [] and res.refs == ["ref1"]


def test_a_dead_replicas_late_hot_report_is_refused():
    kv = make_index()
    kv.drop_holders(["r1"])
    assert kv.add_hot("t:k3", "uid3", "r1") is False and kv.stats()["late_hot_refused"] == 1
    assert kv.add_hot("t:k3", "uid3", "r4") is True and hot(kv)["t:k3"] == ["r4"]


def test_the_dead_set_is_bounded():
    kv = make_index()
    kv.MAX_DEAD = 3
    kv.drop_holders([f"x{i}" for i in range(5)])
    kv.drop_holders(["r1"])
    assert len(kv._dead) == 3 and "r1" in kv._dead
