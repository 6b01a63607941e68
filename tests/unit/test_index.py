"""SemanticIndex: lookup threshold, tenants, LRU eviction by items and bytes."""
from __future__ import annotations

import numpy as np
import pytest

from semshare_core import SemanticIndex, prompt_vector


def vec(seed: int, dim: int = 64) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_lookup_threshold_and_hit_counters():
    idx = SemanticIndex(64, max_items=10, max_bytes=10_000)
    idx.add("a", vec(1), np.arange(3), 100, "A")
    m = idx.lookup(vec(1), threshold=0.99)
    assert m is not None and m.entry.payload == "A" and m.similarity == pytest.approx(1.0, abs=1e-5)
    assert idx.lookup(vec(2), threshold=0.5) is None
    s = idx.stats()
    assert s["hits"] == 1 and s["misses"] == 1 and s["entries"] == 1 and s["bytes"] == 100


def test_tenants_never_see_each_other():
    idx = SemanticIndex(64)
    idx.add("a", vec(1), np.arange(3), 10, "A", tenant="alice")
    assert idx.lookup(vec(1), tenant="bob", threshold=-1.0) is None
    assert idx.lookup(vec(1), tenant="alice", threshold=0.9).entry.key == "a"
    idx.add("b", vec(1), np.arange(3), 10, "B", tenant="bob")
    assert idx.lookup(vec(1), tenant="bob", threshold=0.9).entry.payload == "B"
    idx.clear(tenant="alice")
    assert idx.lookup(vec(1), tenant="alice", threshold=-1) is None and len(idx) == 1


def test_lru_eviction_by_items():
    idx = SemanticIndex(64, max_items=3, max_bytes=10**9)
    for i in range(3):
        idx.add(f"k{i}", vec(i), np.arange(2), 1, i)
    idx.lookup(vec(0), threshold=0.99)          # k0 becomes most recent
    evicted = idx.add("k3", vec(3), np.arange(2), 1, 3)
    assert [e.key for e in evicted] == ["k1"]
    assert "k0" in idx and "k1" not in idx and len(idx) == 3


def test_eviction_by_bytes_keeps_under_cap_and_oversize_is_rejected():
    idx = SemanticIndex(64, max_items=100, max_bytes=1000)
    for i in range(10):
        idx.add(f"k{i}", vec(i), np.arange(2), 300, i)
        assert idx.nbytes <= 1000
    assert len(idx) == 3 and idx.stats()["evictions"] == 7
    with pytest.raises(ValueError, match="byte cap"):
        idx.add("big", vec(99), np.arange(2), 1001, None)


def test_tenant_quota_evicts_only_that_tenant():
    idx = SemanticIndex(64, max_items=100, max_bytes=10**6, tenant_max_items=2)
    idx.add("b0", vec(50), np.arange(2), 1, 0, tenant="bob")
    for i in range(4):
        idx.add(f"a{i}", vec(i), np.arange(2), 1, i, tenant="alice")
    assert idx.stats("alice")["entries"] == 2 and "b0" in idx


def test_replace_same_key_and_bad_vectors():
    idx = SemanticIndex(64)
    idx.add("a", vec(1), np.arange(2), 10, 1)
    idx.add("a", vec(2), np.arange(2), 20, 2)
    assert len(idx) == 1 and idx.nbytes == 20 and idx.lookup(vec(2), threshold=0.99).entry.payload == 2
    with pytest.raises(ValueError, match="dim"):
        idx.add("b", np.ones(3), np.arange(2), 1, None)
    with pytest.raises(ValueError, match="non-finite"):
        idx.lookup(np.full(64, np.nan))


def test_prompt_vectors_rank_variants_first():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5000, 400) for _ in range(5)]
    idx = SemanticIndex(4096)
    for i, d in enumerate(docs):
        idx.add(f"d{i}", prompt_vector(d), d, 1, i)
    variant = docs[3].copy()
    variant[100:180] = rng.integers(0, 5000, 80)
    m = idx.lookup(prompt_vector(variant), threshold=0.3)
    assert m is not None and m.entry.key == "d3" and 0.5 < m.similarity < 1.0


def test_touch_moves_to_the_lru_end_and_reports_absent_keys():
    idx = SemanticIndex(64, max_items=3, max_bytes=10**9)
    for i in range(3):
        idx.add(f"k{i}", vec(i), np.arange(2), 1, i)
    assert idx.touch("k0") is True
    assert [e.key for e in idx.entries()] == ["k1", "k2", "k0"]
    assert idx.touch("nope") is False
    assert idx.stats()["hits"] == 0 and idx.get("k0").hits == 0  # LRU order only, no hit counted
    evicted = idx.add("k3", vec(3), np.arange(2), 1, 3)
    assert [e.key for e in evicted] == ["k1"]
    idx.remove("k2")
    assert idx.touch("k2") is False


# tenants, salts and fairness -----------------------------------------------------------

def test_salt_flood_does_not_evict_other_tenants():
    """300 requests with random cache_salts from one tenant (global cap 256, no tenant quota)."""
    from semshare_core.namespaces import quota_owner

    idx = SemanticIndex(64, max_items=256, max_bytes=10**12)
    for i in range(20):
        idx.add(f"bob:{i}", vec(i), np.arange(3), 100, i, tenant="bob")
    rng = np.random.default_rng(0)
    for i in range(300):
        ns = f"mallory.salt-{rng.bytes(10).hex()}"
        assert quota_owner(ns) == "mallory"
        idx.add(f"{ns}:k{i}", vec(1000 + i), np.arange(3), 100, i, tenant=ns)
    assert len(idx.entries("bob")) == 20
    assert all(idx.lookup(vec(i), tenant="bob", threshold=0.99) is not None for i in range(20))
    s = idx.stats()
    assert s["owners"]["mallory"]["entries"] == 256 - 20 and s["entries"] == 256
    # empty namespaces gave back their faiss index and counters
    assert s["namespaces"] == 1 + (256 - 20) and len(idx._tenant_items) == s["namespaces"]


def test_salts_count_against_their_tenants_quota():
    idx = SemanticIndex(64, max_items=1000, max_bytes=10**12, tenant_max_items=8, tenant_max_bytes=10_000)
    idx.add("bob:a", vec(1), np.arange(3), 100, "a", tenant="bob")
    idx.add("alice:plain", vec(2), np.arange(3), 100, "p", tenant="alice")
    for i in range(50):
        idx.add(f"alice:{i}", vec(100 + i), np.arange(3), 100, i, tenant=f"alice.salt-{i:020x}")
    owners = idx.stats()["owners"]
    assert owners["alice"]["entries"] == 8 and owners["bob"]["entries"] == 1
    assert idx.get("alice:plain") is None  # its own oldest entry went first (quota over all its salts)
    assert idx.stats("alice.salt-" + f"{49:020x}")["owner_entries"] == 8
    # bytes: the salts share the tenant's byte quota too
    for i in range(5):
        idx.add(f"alice:big{i}", vec(300 + i), np.arange(3), 4000, i, tenant=f"alice.salt-{1000 + i:020x}")
    assert idx.stats()["owners"]["alice"]["bytes"] <= 10_000 and idx.get("bob:a") is not None


def test_full_index_evicts_the_over_share_tenant_first():
    idx = SemanticIndex(64, max_items=10, max_bytes=10**12)
    for i in range(8):
        idx.add(f"a{i}", vec(i), np.arange(2), 1, i, tenant="a")
    idx.add("b0", vec(50), np.arange(2), 1, 0, tenant="b")
    idx.add("b1", vec(51), np.arange(2), 1, 0, tenant="b")
    # full: b (2 of 10, under its share of 5) inserts; a (8) is over: a's LRU goes
    idx.lookup(vec(0), tenant="a", threshold=0.99)  # a0 most recent
    evicted = idx.add("b2", vec(52), np.arange(2), 1, 0, tenant="b")
    assert [e.key for e in evicted] == ["a1"]
    # a (7) inserting while over its share evicts its own entry, not b's older ones
    evicted = idx.add("a9", vec(9), np.arange(2), 1, 0, tenant="a")
    assert [e.key for e in evicted] == ["a2"]
    # one tenant alone: plain LRU
    solo = SemanticIndex(64, max_items=2, max_bytes=10**12)
    for i in range(3):
        solo.add(f"k{i}", vec(i), np.arange(2), 1, i)
    assert [e.key for e in solo.entries()] == ["k1", "k2"]


def test_full_index_by_bytes_is_fair_too():
    idx = SemanticIndex(64, max_items=1000, max_bytes=1000)
    idx.add("b0", vec(50), np.arange(2), 100, 0, tenant="b")
    for i in range(20):
        idx.add(f"a{i}", vec(i), np.arange(2), 100, i, tenant=f"a.salt-{i:020x}")
    assert idx.get("b0") is not None and idx.nbytes <= 1000
