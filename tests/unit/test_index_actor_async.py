"""The index actor's class: lookups run while a registration copies its KV (no Ray cluster:
``ray.put`` is replaced by a slow stand-in)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from semshare_core import ModelSignature, PackedKV


def _packed(n: int = 8) -> PackedKV:
    sig = ModelSignature("LlamaForCausalLM", 2, 1, 4, 8, 100, "{}", "0" * 16)
    return PackedKV(np.zeros((2, 2, 1, n, 4), dtype=np.float32), "float32", np.arange(n, dtype=np.int64), sig)


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
    return v / np.linalg.norm(v)


def test_lookups_do_not_wait_for_a_registrations_copy(monkeypatch):
    from serve_app import index_actor

    started, release = threading.Event(), threading.Event()
    loop_threads = set()

    def slow_put(obj):  # the object-store copy of a long prompt's KV
        assert threading.current_thread() not in loop_threads, "ray.put ran on the event loop"
        started.set()
        release.wait(10)
        return ("ref", id(obj))

    monkeypatch.setattr(index_actor.ray, "put", slow_put)
    actor = index_actor.AsyncKVIndex(64, 16, 1 << 30)

    async def run():
        loop_threads.add(threading.current_thread())
        release.set()
        assert (await actor.register("t:a", _vec(1), np.arange(8), _packed(), "t"))["stored"]
        release.clear()
        started.clear()
        slow = asyncio.create_task(actor.register("t:b", _vec(2), np.arange(8), _packed(), "t"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        hit = await actor.lookup(_vec(1), "t", 0.9)
        miss = await actor.lookup(_vec(2), "t", 0.9)  # not inserted until its copy is done
        stats = await actor.stats()
        took = time.perf_counter() - t0
        assert not slow.done()
        release.set()
        out = await slow
        return hit, miss, stats, took, out, await actor.lookup(_vec(2), "t", 0.9)

    hit, miss, stats, took, out, later = asyncio.run(run())
    assert hit is not None and hit.key == "t:a" and miss is None and stats["entries"] == 1
    assert took < 0.5
    assert out["stored"] and later is not None and later.key == "t:b"


def test_refusals_and_fast_methods_keep_their_answers(monkeypatch):
    from serve_app import index_actor

    monkeypatch.setattr(index_actor.ray, "put", lambda obj: ("ref", id(obj)))
    actor = index_actor.AsyncKVIndex(64, 16, 100)  # 100-byte cap: the KV is larger

    async def run():
        refused = await actor.register("t:x", _vec(1), np.arange(8), _packed(), "t")
        return refused, await actor.ping(), await actor.entries(), await actor.drop_holders(["r1"])

    refused, ping, entries, dropped = asyncio.run(run())
    assert refused["stored"] is False and "byte cap" in refused["reason"]
    assert ping["ok"] and entries == [] and dropped == 0
