"""The per-layer reference feed (``host_staging="layered"``), forced on the CPU: the same
code path a CUDA hit takes, with synchronous copies."""
from __future__ import annotations

import pytest
import torch

from semshare_core import SemShareConfig
from semshare_core.staging import LayerFeed, PinnedSlots

from .tiny import prose, tiny_engine


def _edited_pair(engine, start=60):
    sents = prose(start, 20)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:5] + ["A short new sentence replaces an old one here."] + sents[6:]))
    return ref, ids


@pytest.mark.parametrize("layers,heads,host,dtype", [
    (1, 1, torch.float32, torch.float32),
    (3, 2, torch.bfloat16, torch.bfloat16),
    (4, 4, torch.float32, torch.bfloat16),   # conversion on the way
    (7, 2, torch.bfloat16, torch.float32),
])
def test_layer_feed_equals_whole_gather_and_rotate(layers, heads, host, dtype):
    engine = tiny_engine("llama")
    rot, d = engine.rerotate, engine.signature.head_dim
    g = torch.Generator().manual_seed(layers)
    m, n = 37, 29
    src = torch.randn(layers, 2, heads, m, d, generator=g).to(host)
    idx = torch.randint(0, m, (n,), generator=g)  # repeats and any order
    delta = torch.arange(n) - idx
    whole = src.index_select(3, idx).to(dtype)
    rot.rotate_(whole[:, 0], delta)

    slots = PinnedSlots(torch.device("cpu"), pin=False)
    feed = LayerFeed(src, idx, slots, torch.device("cpu"), dtype, rot.angles(delta, torch.device("cpu")),
                     rot.rotate_angles_)
    with feed:  # the order selective_prefill uses
        feed.stage(0)
        feed.stage(1)
        for l in range(layers):
            feed.ready(l)
            feed.ready(l)  # idempotent: rotated once
            feed.stage(l + 2)
    assert feed.buffer.dtype == dtype and torch.equal(feed.buffer, whole)
    assert len(slots) == 2 and all(s is not None for s in slots.slots[:min(2, layers)])


def test_pinned_slots_reuse_and_grow():
    slots = PinnedSlots(torch.device("cpu"), pin=False)
    a = slots.take(0, (2, 3, 5), torch.float32)
    ptr = slots.slots[0].data_ptr()
    b = slots.take(0, (2, 3, 4), torch.float32)  # smaller: same memory
    assert b.shape == (2, 3, 4) and slots.slots[0].data_ptr() == ptr
    c = slots.take(0, (2, 3, 9), torch.float32)  # larger: grows
    assert c.shape == (2, 3, 9) and slots.slots[0].numel() >= c.numel()
    assert slots.take(1, (2,), torch.bfloat16).dtype == torch.bfloat16
    del a


@pytest.mark.parametrize("changes", [{}, {"selection": "attention"}, {"retention": 0.5}, {"recompute_ratio": 1.0}])
def test_layered_hit_equals_whole_hit(engine, changes):
    ref, ids = _edited_pair(engine)
    cfg = engine.config.with_(**changes)
    whole = engine.prefill(ids, ref, cfg.with_(host_staging="whole"))
    auto = engine.prefill(ids, ref, cfg)
    layered = engine.prefill(ids, ref, cfg.with_(host_staging="layered"))
    assert (whole.stats.staging, auto.stats.staging, layered.stats.staging) == ("cpu", "cpu", "layered")
    assert torch.equal(layered.logits, whole.logits) and torch.equal(auto.logits, whole.logits)
    assert all(torch.equal(a, b) for a, b in zip(layered.keys, whole.keys))
    assert all(torch.equal(a, b) for a, b in zip(layered.values, whole.values))
    assert layered.stats.rows_per_layer == whole.stats.rows_per_layer
    assert layered.stats.retained_per_layer == whole.stats.retained_per_layer


def test_layered_slots_are_kept_across_hits(engine):
    ref, ids = _edited_pair(engine)
    cfg = engine.config.with_(host_staging="layered")
    first = engine.prefill(ids, ref, cfg)
    slots = engine.layer_slots
    ptrs = [s.data_ptr() for s in slots.slots]
    sizes = [s.numel() for s in slots.slots]
    again = engine.prefill(ids, ref, cfg)
    assert [s.data_ptr() for s in slots.slots] == ptrs and [s.numel() for s in slots.slots] == sizes
    assert torch.equal(again.logits, first.logits)
    assert all(torch.equal(a, b) for a, b in zip(again.keys, first.keys))
    # the buffer a hit returns is its own: the next hit does not write into it
    assert first.keys[0].data_ptr() != again.keys[0].data_ptr()


def test_an_exception_in_the_layer_loop_leaves_the_engine_usable(engine, monkeypatch):
    ref, ids = _edited_pair(engine, 100)
    cfg = engine.config.with_(host_staging="layered")
    before = engine.prefill(ids, ref, cfg)
    finished = []
    real_finish = LayerFeed.finish
    monkeypatch.setattr(LayerFeed, "finish", lambda self: (finished.append(1), real_finish(self))[1])
    layer = engine.model.model.layers[2]

    def boom(*args, **kwargs):
        raise RuntimeError("layer 2 failed")

    monkeypatch.setattr(layer, "forward", boom)
    with pytest.raises(RuntimeError, match="layer 2 failed"):
        engine.prefill(ids, ref, cfg)
    assert finished  # the pending copies were waited for on the way out
    monkeypatch.undo()
    after = engine.prefill(ids, ref, cfg)
    assert torch.equal(after.logits, before.logits)
    assert all(torch.equal(a, b) for a, b in zip(after.keys, before.keys))
    assert torch.equal(engine.prefill(ids, ref, cfg.with_(host_staging="whole")).logits, before.logits)


def test_staging_mode_and_stats():
    engine = tiny_engine("llama")
    cfg = engine.config
    assert engine.staging_mode(cfg) == "cpu"
    assert engine.staging_mode(cfg.with_(host_staging="whole")) == "cpu"
    assert engine.staging_mode(cfg.with_(host_staging="layered")) == "layered"
    ref, ids = _edited_pair(engine)
    assert engine.staging_mode(cfg.with_(host_staging="layered"), ref.to_torch()) == "device"
    dev = engine.prefill(ids, ref, cfg.with_(host_staging="layered"), reference_kv=ref.to_torch(engine.device))
    assert dev.stats.staging == "device"
    assert engine.prefill(ids).stats.staging == ""


def test_host_staging_is_validated():
    for ok in ("auto", "layered", "whole"):
        assert SemShareConfig(host_staging=ok).host_staging == ok
    with pytest.raises(ValueError, match="host_staging"):
        SemShareConfig(host_staging="bogus")
    assert SemShareConfig.from_dict(SemShareConfig(host_staging="whole").to_dict()).host_staging == "whole"


class _FakeCuda:
    """Stands in for torch.cuda streams/events on the CPU and logs the ordering calls."""

    def __init__(self, log):
        self.log = log
        outer = self

        class Event:
            count = 0

            def __init__(self):
                self.id = None

            def record(self, stream=None):
                self.id = Event.count
                Event.count += 1
                outer.log.append(("record", self.id))

            def synchronize(self):
                outer.log.append(("sync", self.id))

        class Stream:
            def wait_event(self, event):
                outer.log.append(("wait", event.id))

            def wait_stream(self, other):
                outer.log.append(("wait_stream",))

        class _Ctx:
            def __enter__(self):
                outer.log.append(("side",))

            def __exit__(self, *exc):
                outer.log.append(("main",))

        self.Event, self.Stream, self.current = Event, Stream, Stream()
        self.stream = lambda s: _Ctx()
        self.current_stream = lambda device=None: self.current


def test_async_ordering_of_the_layer_feed(monkeypatch):
    """The CUDA branch, with fake streams/events: each copy is issued on the side stream and
    recorded, the compute stream waits for a layer's event before its keys are rotated, a
    slot's previous copy is waited for before the slot is overwritten, and ``finish`` waits
    for every copy, also when the layer loop raises."""
    engine = tiny_engine("llama")
    rot, d = engine.rerotate, engine.signature.head_dim
    L, n = 5, 11
    g = torch.Generator().manual_seed(1)
    src = torch.randn(L, 2, 2, 17, d, generator=g)
    idx = torch.randint(0, 17, (n,), generator=g)
    delta = torch.arange(n) - idx
    log = []
    fake = _FakeCuda(log)
    for name in ("Event", "Stream", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    slots = PinnedSlots(torch.device("cpu"), pin=False)
    rotated = []

    def rotate(keys, cos, sin):
        log.append(("rotate", len(rotated)))
        rotated.append(1)
        return rot.rotate_angles_(keys, cos, sin)

    feed = LayerFeed(src, idx, slots, torch.device("cpu"), torch.float32, rot.angles(delta, torch.device("cpu")),
                     rotate)
    feed.asynchronous, feed.stream = True, fake.Stream()  # take the CUDA branch
    with pytest.raises(RuntimeError, match="midway"):
        with feed:
            feed.stage(0)
            feed.stage(1)
            for l in range(L):
                feed.ready(l)
                feed.stage(l + 2)
                if l == 2:
                    raise RuntimeError("midway")
    # layer l's copy is event l; rotation l comes after the compute stream waited on it
    for l in range(3):
        assert log.index(("record", l)) < log.index(("wait", l)) < log.index(("rotate", l))
    # slot l % 2 is reused by layer l + 2 only after copy l finished on the host side
    for l in range(2, 5):
        assert log.index(("sync", l - 2)) < log.index(("record", l))
    # finish: the compute stream waits on every copy issued (layers 0..4), after the raise
    tail = log[log.index(("rotate", 2)) + 1:]
    assert {("wait", l) for l in range(5)} <= set(tail)
    assert slots.events[0] is not None and slots.events[1] is not None  # the next hit syncs on them
    whole = src.index_select(3, idx)
    rot.rotate_(whole[:, 0], delta)
    assert torch.equal(feed.buffer[:3], whole[:3])
