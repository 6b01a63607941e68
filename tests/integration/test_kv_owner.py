"""The per-node KV owner (issue 16): a registration's KV is put by an actor on the
replica's own node, and only its ref reaches the index actor (``register_ref``)."""
from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from test_index_actor import _entry

pytestmark = pytest.mark.ray

NS = "semshare_kvo"


def test_the_owner_lives_on_the_node_and_owns_what_the_index_refers_to(server, engine):
    import ray
    from ray.exceptions import ObjectLostError, OwnerDiedError

    from serve_app.index_actor import get_or_create_index_actor
    from serve_app.kv_owner import get_or_create_kv_owner, kill_kv_owners, owner_name

    node = ray.get_runtime_context().get_node_id()
    index = get_or_create_index_actor("kvo-index", NS, engine.config.fingerprint_dim, max_items=8,
                                      max_bytes=1 << 30, detached=False)
    owner = get_or_create_kv_owner("kvo-index", NS, node)
    try:
        assert ray.get(owner.node_id.remote()) == node
        assert ray.get_actor(owner_name("kvo-index", node), namespace=NS)._actor_id == owner._actor_id
        # one owner per (index, node): a second resolve is the same actor
        assert get_or_create_kv_owner("kvo-index", NS, node)._actor_id == owner._actor_id

        ids, vec, packed = _entry(engine, 7)
        refs = ray.get(owner.put.remote(packed))
        assert len(refs) == 1 and isinstance(refs[0], ray.ObjectRef)
        out = ray.get(index.register_ref.remote("t:a", vec, ids, refs, packed.nbytes, True, "t", 0, None, None))
        assert out["stored"] and out["nbytes"] == packed.nbytes
        del refs
        gc.collect()  # the caller (a replica) lets go: the index's ref keeps the object

        hit = ray.get(index.lookup.remote(vec, "t", 0.3))
        assert hit.key == "t:a"
        got = ray.get(hit.refs[0], timeout=30)
        assert np.array_equal(got.data, packed.data) and np.array_equal(got.token_ids, ids)
        audit = ray.get(index.audit.remote())
        assert audit["lost"] == [] and audit["sum_object_nbytes"] == audit["sum_entry_nbytes"] == packed.nbytes

        # the object's owner is the KV owner, not the index or the caller: it dies with it
        del got, hit
        gc.collect()  # no zero-copy view of ours pins it in the store
        assert kill_kv_owners("kvo-index", NS) == 1
        deadline = time.time() + 60
        while (audit := ray.get(index.audit.remote()))["lost"] != ["t:a"]:
            assert time.time() < deadline, audit
            time.sleep(0.5)
        with pytest.raises((OwnerDiedError, ObjectLostError)):
            ray.get(ray.get(index.lookup.remote(vec, "t", 0.3)).refs[0], timeout=30)
    finally:
        kill_kv_owners("kvo-index", NS)
        ray.kill(index, no_restart=True)


def test_register_ref_keeps_the_byte_cap_and_refuses_anything_but_one_ref(server, engine):
    import ray

    from serve_app.index_actor import get_or_create_index_actor

    ids, vec, packed = _entry(engine, 8)
    tiny = get_or_create_index_actor("kvo-tiny", NS, engine.config.fingerprint_dim, max_items=8,
                                     max_bytes=packed.nbytes - 1, detached=False)
    try:
        ref = ray.put(packed)
        out = ray.get(tiny.register_ref.remote("t:x", vec, ids, [ref], packed.nbytes, True, "t"))
        assert out["stored"] is False and out["reason"] == "larger than the byte cap"
        st = ray.get(tiny.stats.remote())
        assert st["rejected"] == 1 and st["entries"] == 0
        with pytest.raises(ray.exceptions.RayTaskError, match="ObjectRef"):
            ray.get(tiny.register_ref.remote("t:y", vec, ids, packed, packed.nbytes, True, "t"))
    finally:
        ray.kill(tiny, no_restart=True)
