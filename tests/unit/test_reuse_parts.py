"""Pieces of the serving reuse path that need no Ray: the ingress codec agrees with the
engine, the hot tier is an LRU by bytes, the protocol checks requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core import SemShareEngine
from semshare_core.models import corpus_text, tiny_random, train_tiny_tokenizer


@pytest.fixture(scope="module")
def engine():
    lm = tiny_random("llama")
    return SemShareEngine(lm.model, lm.tokenizer)


def test_ingress_codec_matches_the_engine(engine):
    from serve_app.front import PromptCodec, tokenizer_digest

    codec = PromptCodec(train_tiny_tokenizer(512), engine.config)  # trained again: as on the ingress
    assert codec.digest == tokenizer_digest(engine.tokenizer)
    text = " ".join(corpus_text()[3000:4200].split())
    ids = codec.encode(text)
    assert np.array_equal(ids, engine.encode(text))
    assert np.array_equal(codec.fingerprint(ids), engine.fingerprint(ids))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text[:300]}]
    assert np.array_equal(codec.encode_chat(msgs), engine.encode_chat(msgs))
    from serve_app.protocol import ClientError

    with pytest.raises(ClientError) as e:
        codec.tokenize(text, None, 10)
    assert e.value.error_type == "context_length_exceeded"


def _entry(uid: str, nbytes: int, key: str = "t:k"):
    from serve_app.hot_tier import HotEntry

    return HotEntry(uid, key, None, torch.zeros(1), nbytes, 0, True)


def test_hot_tier_is_an_lru_by_bytes():
    from serve_app.hot_tier import HotTier

    gone = []
    t = HotTier(100, on_evict=lambda es: gone.extend(e.uid for e in es))
    assert t.put(_entry("a", 40)) and t.put(_entry("b", 40))
    assert t.get("a") is not None  # a is now the most recent
    assert t.put(_entry("c", 40))
    assert gone == ["b"] and t.nbytes == 80 and "b" not in t and "a" in t and "c" in t
    assert not t.put(_entry("huge", 101)) and t.counters["rejected"] == 1
    assert t.get("b") is None and t.counters["misses"] == 1
    t.put(_entry("d", 10, key="t:other"))
    assert [e.uid for e in t.drop_key("t:k")] and t.nbytes == 10 and len(t) == 1


def test_default_hot_bytes_is_bounded():
    from serve_app.hot_tier import default_hot_bytes

    n = default_hot_bytes("cpu")
    assert 0 < n <= 1 << 30


def test_gpu_hot_tier_is_sized_from_what_is_left_of_the_replicas_share():
    from serve_app.hot_tier import hot_bytes_for

    G = 1 << 30
    assert hot_bytes_for(80 * G, 1, 16 * G, 24 * G) == int(0.2 * 80 * G)        # plenty left: 20% of the card
    assert hot_bytes_for(80 * G, 0.5, 16 * G, 12 * G) == int(0.5 * (40 - 28) * G)  # half a card: what is left
    assert hot_bytes_for(80 * G, 0.25, 16 * G, 6 * G) == 0                         # nothing left: no hot tier
    # four quarter-GPU replicas never promise more than the card holds
    assert 4 * (hot_bytes_for(80 * G, 0.25, 2 * G, 6 * G) + 2 * G + 6 * G) <= 80 * G


def test_replica_request_checks():
    from serve_app.protocol import ClientError, ReplicaRequest, Sampling

    s = Sampling(4, 0.0, 1.0)
    ok = ReplicaRequest("t", s, ids=np.arange(5, dtype=np.int64))
    ok.check(10, 512)
    for bad, status in [(ReplicaRequest("a b", s, ids=np.arange(5)), 400),
                        (ReplicaRequest("t", s, store_key="has space", ids=np.arange(5)), 400),
                        (ReplicaRequest("t", s, ids=np.arange(20, dtype=np.int64)), 400),
                        (ReplicaRequest("t", s, ids=np.arange(5, dtype=np.int32)), 500),
                        (ReplicaRequest("t", s, ids=np.array([1, 9999], dtype=np.int64)), 500),
                        (ReplicaRequest("t", s), 400)]:
        with pytest.raises(ClientError) as e:
            bad.check(10, 512)
        assert e.value.status == status
    assert Sampling(4, 1e-9, 0.0).normalized().temperature == 0.0


def test_reference_check_rejects_any_non_finite_value_and_bad_logits(engine):
    from semshare_core import KVFormatError, PackedKV
    from serve_app.kvcheck import load_reference

    ids = engine.encode(" ".join(corpus_text()[9000:9400].split()))
    good = engine.export_kv(engine.prefill(ids))
    assert good.last_logits is not None
    load_reference(good, engine.signature, ids.size)
    for vals in ([np.nan], [np.inf], [np.inf, -np.inf], [-np.inf]):
        data = good.data.copy()
        for j, v in enumerate(vals):
            data[1 + j, 1, 0, 3 + j, 2] = v
        with pytest.raises(KVFormatError):
            load_reference(PackedKV(data, good.dtype, good.token_ids, good.signature), engine.signature)
    logits = good.last_logits.copy()
    logits[5] = np.nan
    with pytest.raises(KVFormatError, match="logits"):
        load_reference(PackedKV(good.data, good.dtype, good.token_ids, good.signature, logits), engine.signature)


def test_cold_hit_on_an_accelerator_leaves_staging_to_the_engine(engine, monkeypatch):
    """On a non-CPU device a cold fetch hands the host PackedKV to the engine (no whole
    pageable copy before the prefill: the engine stages rows per layer through pinned
    buffers), and the hot-tier admission goes through the reusable pinned buffer, later."""
    import types

    from serve_app.reuse import ReusePath
    from serve_app.settings import resolve_args

    ids = engine.encode(corpus_text()[5000:5600])
    packed = engine.export_kv(engine.prefill(ids))
    fake = types.SimpleNamespace(device=torch.device("meta"), dtype=engine.dtype, signature=engine.signature)
    path = ReusePath(fake, resolve_args({"preset": "tiny-random", "hot_tier_bytes": 1 << 20}), "r1", index=None)
    admitted = []
    monkeypatch.setattr(path, "_admit_pinned", lambda ref, p: admitted.append((ref.key, p)))
    copies = []
    monkeypatch.setattr("serve_app.reuse.device_kv", lambda *a, **k: copies.append(a))

    ready, fb = _cold_acquire(path, packed, int(ids.size))
    assert fb is None and ready.tier == "cold" and ready.kv is None and ready.packed is packed
    assert copies == [] and admitted == [("t:k", packed)]


def test_affinity_prefers_the_holder_of_the_best_source():
    """Several sources: the replica holding the best (first) source wins over one holding a
    longer secondary source; among holders of the best, the one holding most others."""
    from serve_app.protocol import Reference, ReplicaRequest, Sampling

    def ref(key, n, hot):
        return Reference(key, key, 0.9, n, hot=hot)

    req = ReplicaRequest("t", Sampling(4, 0.0, 1.0), reference=ref("a", 100, ["r1"]),
                         more_sources=[ref("b", 900, ["r2"])])
    assert req.hot_replicas == ["r1"]
    req.reference = ref("a", 100, ["r1", "r2"])
    assert req.hot_replicas == ["r2"]
    req.reference = ref("a", 100, [])
    assert req.hot_replicas == ["r2"]
    assert ReplicaRequest("t", Sampling(4, 0.0, 1.0), reference=ref("a", 10, ["r1", "r3"])).hot_replicas == ["r1", "r3"]
    assert ReplicaRequest("t", Sampling(4, 0.0, 1.0)).hot_replicas == []


def _fetched(packed):
    """``packed`` as ``ray.get`` hands it over: read-only arrays that are views of a buffer
    this process does not own (the object store), not copies."""
    from semshare_core import PackedKV

    def view(a):
        v = np.frombuffer(memoryview(np.ascontiguousarray(a)).toreadonly(), dtype=a.dtype).reshape(a.shape)
        assert not v.flags.writeable and not v.flags.owndata
        return v

    return PackedKV(view(packed.data), packed.dtype, view(packed.token_ids), packed.signature,
                    view(packed.last_logits), packed.exact)


def test_a_cold_hit_on_the_cpu_keeps_a_private_copy_hot_and_releases_the_fetched_object(engine):
    """The request reads the fetched object in place; the hot tier gets a copy in the
    replica's own memory (so the object store can free the object once the index drops its
    entry), and the request's views go when it has prefilled. A cold fetch of a key's new
    version drops the stale version held hot."""
    from serve_app.hot_tier import HotEntry
    from serve_app.reuse import ReusePath
    from serve_app.settings import resolve_args

    ids = engine.encode(corpus_text()[6000:6600])
    fetched = _fetched(engine.export_kv(engine.prefill(ids)))
    path = ReusePath(engine, resolve_args({"preset": "tiny-random", "hot_tier_bytes": 1 << 24}), "r1", index=None)
    stale = engine.export_kv(engine.prefill(ids[:20]))
    path.hot.put(HotEntry("uid0", "t:k", stale, stale.to_torch(), stale.nbytes, 0, True))

    ready, fb = _cold_acquire(path, fetched, int(ids.size))
    assert fb is None and ready.tier == "cold" and ready.packed is fetched
    assert "uid0" not in path.hot and len(path.hot) == 1  # the stale version went
    hot = path.hot.get("uid1")
    for name in ("data", "token_ids", "last_logits"):
        own, src = getattr(hot.packed, name), getattr(fetched, name)
        assert np.array_equal(own, src) and not np.shares_memory(own, src), name
    assert hot.kv.data_ptr() == hot.packed.data.ctypes.data  # the CPU tensor is a view of the copy
    assert hot.nbytes == fetched.nbytes == path.hot.nbytes
    ready.release()
    assert ready.packed is None and ready.kv is None and ready.ref.refs == []


def test_registration_drops_the_versions_it_evicted_from_the_hot_tier(engine):
    """The index answers a registration with the versions it evicted to make room: the
    registering replica drops its hot copies of them at once."""
    import asyncio

    from serve_app.hot_tier import HotEntry
    from serve_app.reuse import ReusePath
    from serve_app.settings import resolve_args

    class Index:
        async def call(self, method, *args, **kw):
            assert method == "register"
            return {"stored": True, "key": args[0], "evicted": ["t:old"], "evicted_uids": ["uid-old"]}

    path = ReusePath(engine, resolve_args({"preset": "tiny-random", "hot_tier_bytes": 1 << 24}), "r1", Index())
    old = engine.export_kv(engine.prefill(engine.encode(corpus_text()[7000:7300])))
    path.hot.put(HotEntry("uid-old", "t:old", old, old.to_torch(), old.nbytes, 0, True))
    ids = engine.encode(corpus_text()[8000:8300])

    async def go():
        export = path.start_export(engine.prefill(ids))
        return await path.register("t:new", engine.fingerprint(ids), ids, "t", 0, export)

    out = asyncio.run(go())
    assert out["stored"] and "uid-old" not in path.hot and len(path.hot) == 1


def test_reference_lsh_tables_do_not_keep_the_reference_ids_alive():
    """The engine caches LSH tables across requests: they hold a copy of the reference's
    token ids, never the (possibly object-store) array they were built from."""
    from semshare_core.matching import ReferenceLSH

    ref = np.arange(40, dtype=np.int64)
    lsh = ReferenceLSH(ref, lambda ids: torch.randn(len(ids), 8), bits=4, tables=2)
    assert np.array_equal(lsh.ids, ref) and not np.shares_memory(lsh.ids, ref)


def test_an_admission_finishing_after_the_entry_was_reported_bad_keeps_nothing_hot(engine):
    """The hot-tier copy of a cold fetch is made in a worker thread; if the engine rejected
    the entry meanwhile (reported bad, dropped everywhere), the late copy is not kept."""
    import asyncio

    from serve_app.protocol import Reference
    from serve_app.reuse import ReusePath
    from serve_app.settings import resolve_args

    ids = engine.encode(corpus_text()[9000:9300])
    fetched = _fetched(engine.export_kv(engine.prefill(ids)))
    path = ReusePath(engine, resolve_args({"preset": "tiny-random", "hot_tier_bytes": 1 << 24}), "r1", index=None)
    ref = Reference("t:bad", "uid-bad", 0.9, int(ids.size))
    asyncio.run(path.report_bad(ref, "corrupt"))  # the index is unreachable here: logged, not raised
    path._admit_host(ref, fetched)
    assert "uid-bad" not in path.hot and len(path.hot) == 0


def _cold_acquire(path, packed, n: int, key: str = "t:k", uid: str = "uid1"):
    """``path.acquire`` of a cold reference whose object-store fetch yields ``packed``; waits
    for the background work it starts (hot-tier admission). Returns ``(ready, fallback)``."""
    import asyncio

    from serve_app.protocol import Reference

    async def go():
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(packed)
        ready, fb = await path.acquire(Reference(key, uid, 0.9, n, refs=[fut]))
        await asyncio.gather(*path.pending)
        return ready, fb

    return asyncio.run(go())
