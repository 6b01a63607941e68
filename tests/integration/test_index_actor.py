"""IndexActor on its own (same Ray session): ownership, nesting, tenants, byte-cap eviction."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def _entry(engine, i: int):
    from semshare_core.models import corpus_text

    text = " ".join(corpus_text()[20000 + i * 3000: 20000 + i * 3000 + 500].split())
    ids = engine.encode(text)
    pre = engine.prefill(ids)
    return ids, engine.fingerprint(ids), engine.export_kv(pre)


def test_byte_cap_eviction_and_accounting(server, engine):
    import ray

    from serve_app.index_actor import get_or_create_index_actor

    items = [_entry(engine, i) for i in range(6)]
    per = max(p.nbytes for _, _, p in items)
    cap = int(per * 3.5)
    actor = get_or_create_index_actor("evict-test", "semshare_it", engine.config.fingerprint_dim,
                                      max_items=100, max_bytes=cap, detached=False)
    evicted = []
    for i, (ids, vec, packed) in enumerate(items):
        out = ray.get(actor.register.remote(f"t:e{i}", vec, ids, packed, "t"))
        assert out["stored"] and out["nbytes"] == packed.nbytes
        evicted += out["evicted"]
        st = ray.get(actor.stats.remote())
        assert st["bytes"] <= cap
    assert evicted[:3] == ["t:e0", "t:e1", "t:e2"]  # LRU order
    st = ray.get(actor.stats.remote())
    assert st["entries"] == 3 and st["evictions"] == 3
    audit = ray.get(actor.audit.remote())
    assert audit["lost"] == [] and audit["sum_object_nbytes"] == audit["sum_entry_nbytes"] == st["bytes"]
    assert st["bytes"] == sum(p.nbytes for _, _, p in items[3:])

    # lookup: nested ref, only the caller's tenant, evicted entries gone
    ids, vec, packed = items[5]
    hit = ray.get(actor.lookup.remote(vec, "t", 0.3))
    assert hit.key == "t:e5" and hit.similarity > 0.99 and hit.ref_token_count == ids.size
    assert len(hit.refs) == 1 and isinstance(hit.refs[0], ray.ObjectRef)
    got = ray.get(hit.refs[0])
    assert np.array_equal(got.data, packed.data) and np.array_equal(got.token_ids, ids)
    assert ray.get(actor.lookup.remote(vec, "other", 0.3)) is None
    old = ray.get(actor.lookup.remote(items[0][1], "t", 0.9))
    assert old is None or old.key != "t:e0"

    # an entry bigger than the cap is refused, not an error
    big = ray.get(actor.register.remote("t:big", vec, ids, packed, "t"))
    assert big["stored"]  # fits
    tiny = get_or_create_index_actor("evict-test-2", "semshare_it", engine.config.fingerprint_dim,
                                     max_items=10, max_bytes=packed.nbytes - 1, detached=False)
    out = ray.get(tiny.register.remote("t:x", vec, ids, packed, "t"))
    assert out["stored"] is False and ray.get(tiny.stats.remote())["rejected"] == 1

    # report_lost removes and counts; clear by tenant
    assert ray.get(actor.report_lost.remote("t:e5")) is True
    st = ray.get(actor.stats.remote())
    assert st["lost_objects"] == 1
    assert ray.get(actor.clear.remote("t")) == st["entries"]
    assert ray.get(actor.stats.remote())["bytes"] == 0
    ray.kill(actor)
    ray.kill(tiny)


def test_salt_flood_through_the_actor_leaves_other_tenants(server, engine):
    """One tenant registers under a fresh cache_salt each time (as the ingress names them):
    the other tenant's entries stay, and the actor's per-namespace state stays bounded."""
    import ray

    from serve_app.index_actor import get_or_create_index_actor
    from serve_app.ingress import salted_tenant

    ids, vec, packed = _entry(engine, 0)
    actor = get_or_create_index_actor("salt-flood-test", "semshare_it", engine.config.fingerprint_dim,
                                      max_items=16, max_bytes=1 << 40, detached=False)
    rng = np.random.default_rng(1)
    bob = [rng.standard_normal(vec.size).astype(np.float32) for _ in range(4)]
    bob = [v / np.linalg.norm(v) for v in bob]
    for i, v in enumerate(bob):
        assert ray.get(actor.register.remote(f"bob:{i}", v, ids, packed, "bob"))["stored"]
    refs = []
    for i in range(60):
        ns = salted_tenant("mallory", f"salt-{rng.integers(1 << 62)}")
        refs.append(actor.register.remote(f"{ns}:k", vec, ids, packed, ns))
        refs.append(actor.lookup.remote(vec, ns, 0.5))
    ray.get(refs)
    for v in bob:
        assert ray.get(actor.lookup.remote(v, "bob", 0.99)) is not None
    st = ray.get(actor.stats.remote())
    assert st["entries"] == 16 and st["tenants"]["bob"]["entries"] == 4
    ray.kill(actor)
