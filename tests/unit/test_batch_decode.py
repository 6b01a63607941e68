"""Continuous batching: batched decode over ragged KV equals batch-1 decode.

Tiny fp32 Llama and Mistral; misses and hits, pruned and unpruned, mixed prompt
lengths, requests joining and leaving mid-batch; seeded sampling; cancellation;
KV budgets; identical repeats of a hit's prompt replay.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from semshare_core import SemShareConfig, SemShareEngine
from semshare_core.scheduler import GenParams, Request, RequestRefused, Scheduler, SchedulerConfig

from .tiny import prose, tiny_engine, tokenizer


def _ids(engine, start: int, count: int) -> np.ndarray:
    return engine.encode(" ".join(prose(start, count)))


class Collector:
    """A sink: records every event of one request."""

    def __init__(self):
        self.events: list[tuple] = []

    def __call__(self, ev: tuple) -> None:
        self.events.append(ev)

    @property
    def tokens(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "token"]

    @property
    def finished(self):
        return next((e[1] for e in self.events if e[0] in ("finished", "error")), None)


def _run(sched: Scheduler, reqs: list[Request], max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not sched.has_work() and not sched._inbox:
            return
        sched.step()
    raise AssertionError("scheduler did not finish")


def run_plan(sched: Scheduler, plan: list[tuple], cfg: SemShareConfig) -> tuple[list[Collector], list[int]]:
    """Submit each ``(ids, reference, max_new_tokens, step)`` of ``plan`` at its step and run
    the scheduler until all finish; returns the requests' sinks and each step's batch size."""
    sinks = [Collector() for _ in plan]
    reqs = [Request(ids, GenParams(max_new_tokens=n, stop_on_eos=False), sink, reference=r, config=cfg)
            for (ids, r, n, _), sink in zip(plan, sinks)]
    last = max(at for *_, at in plan)
    sizes = []
    for step in range(1000):
        for req, (*_, at) in zip(reqs, plan):
            if at == step:
                sched.submit(req)
        if step > last and not sched.has_work() and not sched._inbox:
            return sinks, sizes
        sizes.append(sched.step().batch)
    raise AssertionError("scheduler did not finish")


def _reference_tokens(engine: SemShareEngine, ids, reference, n: int, **kw) -> list[int]:
    pre = engine.prefill(ids, reference)
    return list(engine.decode(pre, max_new_tokens=n, stop_on_eos=False, **kw))


def _hit_config(engine, retention: float) -> SemShareConfig:
    return engine.config.with_(retention=retention)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("retention", [1.0, 0.5])
def test_batched_greedy_equals_batch_one_with_joins_and_leaves(arch, retention):
    engine = tiny_engine(arch)
    cfg = _hit_config(engine, retention)
    doc = _ids(engine, 100, 14)
    ref = engine.export_kv(engine.prefill(doc))
    variant = _ids(engine, 100, 6)[:-3].tolist() + _ids(engine, 300, 2).tolist() + _ids(engine, 107, 6).tolist()
    variant = np.asarray(variant, dtype=np.int64)
    # (ids, reference, max_new_tokens, step at which it is submitted)
    plan = [(_ids(engine, 0, 3), None, 12, 0), (_ids(engine, 10, 9), None, 5, 0), (variant, ref, 9, 0),
            (_ids(engine, 40, 1), None, 16, 2), (doc, ref, 24, 3), (_ids(engine, 60, 5), None, 3, 6)]
    # (the identical repeat of doc replays and is prefilled first: it decodes long enough to overlap)
    sched = Scheduler(engine, SchedulerConfig(max_running=8, max_step_tokens=64, prefill_chunk=32))
    sinks, batch_sizes = run_plan(sched, plan, cfg)
    assert max(batch_sizes) >= 4, batch_sizes  # really batched, with mixed lengths
    for (ids, r, n, _), sink in zip(plan, sinks):
        want = [t for t in _reference_tokens(engine.__class__(engine.model, engine.tokenizer, cfg), ids, r, n)]
        assert sink.tokens == want
        assert sink.finished == "length"
        assert sink.events[0][0] == "prefilled"
    hit_pre = sinks[2].events[0][1]
    assert hit_pre.stats.hit and hit_pre.explicit_positions
    assert sched.reserved_bytes == 0 and sched.kv_bytes() == 0


def test_chunked_full_prefill_equals_one_shot():
    engine = tiny_engine("llama")
    ids = _ids(engine, 200, 12)
    one = engine.prefill(ids)
    steps = engine.prefill_steps(ids, chunk=16)
    yielded = []
    while True:
        try:
            yielded.append(next(steps))
        except StopIteration as s:
            chunked = s.value
            break
    assert sum(yielded) < ids.size and all(y == 16 for y in yielded)  # the last chunk returns, not yields
    assert torch.allclose(chunked.logits, one.logits, atol=1e-5)
    for a, b in zip(chunked.keys, one.keys):
        assert torch.allclose(a, b, atol=1e-5)
    assert chunked.exact


def test_seeded_sampling_matches_batch_one():
    engine = tiny_engine("llama")
    params = dict(temperature=0.9, top_p=0.8, seed=1234)
    prompts = [_ids(engine, 0, 2), _ids(engine, 20, 5), _ids(engine, 50, 3)]
    sched = Scheduler(engine, SchedulerConfig(max_running=4))
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        sched.submit(Request(ids, GenParams(max_new_tokens=10, stop_on_eos=False, **params), sink))
    _run(sched, [])
    for ids, sink in zip(prompts, sinks):
        assert sink.tokens == _reference_tokens(engine, ids, None, 10, **params)
    # and another seed gives another sequence (the seed is really used)
    other = _reference_tokens(engine, prompts[0], None, 10, temperature=0.9, top_p=0.8, seed=99)
    assert other != sinks[0].tokens


def test_cancellation_frees_slot_and_kv():
    engine = tiny_engine("llama")
    sched = Scheduler(engine, SchedulerConfig(max_running=2))
    a, b = Collector(), Collector()
    ra = Request(_ids(engine, 0, 6), GenParams(max_new_tokens=50, stop_on_eos=False), a)
    rb = Request(_ids(engine, 30, 6), GenParams(max_new_tokens=50, stop_on_eos=False), b)
    sched.submit(ra)
    sched.submit(rb)
    for _ in range(3):
        sched.step()
    assert len(sched.running) == 2 and sched.kv_bytes() > 0
    held = sched.kv_bytes()
    sched.cancel(ra.id)
    sched.step()
    assert a.finished == "cancelled" and len(sched.running) == 1
    assert 0 < sched.kv_bytes() < held
    n_a = len(a.tokens)
    sched.cancel(rb.id)
    sched.step()
    assert b.finished == "cancelled" and len(a.tokens) == n_a
    assert sched.running == [] and sched.kv_bytes() == 0 and sched.reserved_bytes == 0


def test_over_budget_requests_wait_then_run():
    engine = tiny_engine("llama")
    probe = Scheduler(engine)
    ids1, ids2 = _ids(engine, 0, 5), _ids(engine, 40, 5)
    need = max(probe.reservation(ids1.size, 8), probe.reservation(ids2.size, 8))
    sched = Scheduler(engine, SchedulerConfig(max_running=4, kv_budget_bytes=int(need * 1.5)))
    s1, s2 = Collector(), Collector()
    sched.submit(Request(ids1, GenParams(max_new_tokens=8, stop_on_eos=False), s1))
    sched.submit(Request(ids2, GenParams(max_new_tokens=8, stop_on_eos=False), s2))
    sched.step()
    assert len(sched.running) == 1 and len(sched.waiting) == 1 and s2.events == []  # over budget: waits
    assert sched.reserved_bytes <= sched.config.kv_budget_bytes
    _run(sched, [])
    assert s1.finished == s2.finished == "length"
    assert s2.tokens == _reference_tokens(engine, ids2, None, 8)


def test_refusals_never_fit_and_full_queue():
    engine = tiny_engine("llama")
    ids = _ids(engine, 0, 5)
    sched = Scheduler(engine, SchedulerConfig(kv_budget_bytes=1024))
    with pytest.raises(RequestRefused) as e:
        sched.submit(Request(ids, GenParams(max_new_tokens=8), Collector()))
    assert not e.value.retryable and "KV budget" in str(e.value)
    sched = Scheduler(engine, SchedulerConfig(max_waiting=2))
    for _ in range(2):
        sched.submit(Request(ids, GenParams(max_new_tokens=2), Collector()))
    with pytest.raises(RequestRefused) as e:
        sched.submit(Request(ids, GenParams(max_new_tokens=2), Collector()))
    assert e.value.retryable


def test_failing_hit_is_retried_as_full_prefill(monkeypatch):
    engine = tiny_engine("llama")
    ids = _ids(engine, 0, 8)
    broken = engine.export_kv(engine.prefill(_ids(engine, 0, 9)))

    def boom(*a, **k):
        raise RuntimeError("reuse path failed")

    monkeypatch.setattr(engine, "_prefill_hit", boom)
    sched = Scheduler(engine)
    sink = Collector()
    req = Request(ids, GenParams(max_new_tokens=4, stop_on_eos=False), sink, reference=broken)
    sched.submit(req)
    _run(sched, [])
    assert req.reuse_error is not None and sink.finished == "length"
    assert not sink.events[0][1].stats.hit
    assert sink.tokens == _reference_tokens(engine, ids, None, 4)


def test_identical_repeat_of_a_hit_replays_the_hit():
    engine = tiny_engine("mistral")
    doc = _ids(engine, 100, 10)
    ref = engine.export_kv(engine.prefill(doc))
    variant = np.concatenate([_ids(engine, 100, 5), _ids(engine, 400, 1), _ids(engine, 106, 4)])
    hit = engine.prefill(variant, ref)
    assert hit.stats.hit and not hit.exact
    entry = engine.export_kv(hit)
    assert entry.last_logits is not None and not entry.exact
    first_answer = list(engine.decode(hit, 8, stop_on_eos=False))
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in engine.model.model.layers]
    try:
        rep = engine.prefill(variant, entry)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and rep.stats.hit and rep.stats.recomputed_tokens == 0
    assert not rep.exact  # a replay of a hit's KV is not a full prefill's
    assert list(engine.decode(rep, 8, stop_on_eos=False)) == first_answer
    # the wire format keeps the flag
    from semshare_core import PackedKV

    assert PackedKV.from_bytes(entry.to_bytes()).exact is False


@functools.lru_cache(maxsize=None)
def _windowed_engine() -> SemShareEngine:
    from transformers import MistralConfig, MistralForCausalLM

    tok = tokenizer()
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        sliding_window=16, eos_token_id=0, pad_token_id=0, bos_token_id=None,
                        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(3)
    model = MistralForCausalLM(cfg).eval()
    return SemShareEngine(model, tok, SemShareConfig(window=1, recompute_min_tokens=0))


def test_sliding_window_batched_decode_equals_generate():
    engine = _windowed_engine()
    prompts = [_ids(engine, 0, 4), _ids(engine, 30, 1)]
    assert prompts[0].size > 16 > 0
    sched = Scheduler(engine, SchedulerConfig(max_running=4))
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        sched.submit(Request(ids, GenParams(max_new_tokens=20, stop_on_eos=False), sink))
    _run(sched, [])
    for ids, sink in zip(prompts, sinks):
        out = engine.model.generate(torch.from_numpy(ids)[None], max_new_tokens=20, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert sink.tokens == out[0, ids.size:].tolist()


def test_a_step_budget_never_shrinks_the_next_prompts_chunks():
    """Three long prompts at once: each full prefill goes in whole chunks (a prompt started
    with a step's leftover budget used to be cut into tiny chunks), in arrival order."""
    engine = tiny_engine("llama")
    prompts = [_ids(engine, i * 40, 14) for i in range(3)]
    chunk = 32
    sched = Scheduler(engine, SchedulerConfig(max_running=4, max_step_tokens=chunk, prefill_chunk=chunk))
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        sched.submit(Request(ids, GenParams(max_new_tokens=2, stop_on_eos=False), sink))
    per_step = []
    while sched.has_work() or sched._inbox:
        per_step.append(sched.step().prefill_tokens)
    total = sum(int(p.size) for p in prompts)
    assert sum(per_step) == total
    import math

    assert sum(1 for t in per_step if t) <= sum(math.ceil(p.size / chunk) for p in prompts) + 1, per_step
    assert all(s.finished == "length" for s in sinks)


def test_prepacked_bf16_linears_decode_exactly_like_stock_ones():
    """bf16 on the CPU: decode-sized matmuls go through pre-packed weights; results are the
    stock F.linear's, bit for bit (tokens and logits), and prefill-sized inputs keep F.linear."""
    from semshare_core.models import tiny_random_model
    from semshare_core.prepack import MAX_PACKED_ROWS, prepack_supported

    tok = tokenizer()
    plain = tiny_random_model("llama", vocab_size=len(tok), dtype="bfloat16", seed=5)
    if not prepack_supported(plain):
        pytest.skip("this torch build has no bf16 oneDNN linear")
    stock = SemShareEngine(plain, tok, SemShareConfig(window=1, recompute_min_tokens=0), prepack=False)
    packed_model = tiny_random_model("llama", vocab_size=len(tok), dtype="bfloat16", seed=5)
    fast = SemShareEngine(packed_model, tok, SemShareConfig(window=1, recompute_min_tokens=0))
    assert stock.prepacked == 0 and fast.prepacked == sum(isinstance(m, torch.nn.Linear)
                                                          for m in packed_model.modules())
    ids = _ids(stock, 0, 6)
    a, b = stock.prefill(ids), fast.prefill(ids)
    assert torch.equal(a.logits, b.logits)
    assert list(stock.decode(a, 12, stop_on_eos=False)) == list(fast.decode(b, 12, stop_on_eos=False))
    x = torch.randn(1, 5, packed_model.config.hidden_size, dtype=torch.bfloat16)
    lin = packed_model.model.layers[0].mlp.up_proj
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    big = torch.randn(1, MAX_PACKED_ROWS + 1, packed_model.config.hidden_size, dtype=torch.bfloat16)
    assert torch.equal(lin(big), torch.nn.functional.linear(big, lin.weight))
    assert stock.signature == fast.signature


def test_an_identical_repeat_is_prefilled_before_the_prefills_ahead_of_it():
    """Replays go first (one KV copy each): a repeat admitted behind two full prefills gets its
    first token in the first step, and the others keep their order and tokens."""
    engine = tiny_engine("llama")
    doc = _ids(engine, 100, 10)
    entry = engine.export_kv(engine.prefill(doc))
    long1, long2 = _ids(engine, 0, 12), _ids(engine, 40, 12)
    sched = Scheduler(engine, SchedulerConfig(max_running=4, max_step_tokens=64, prefill_chunk=32))
    a, b, rep = Collector(), Collector(), Collector()
    sched.submit(Request(long1, GenParams(max_new_tokens=4, stop_on_eos=False), a))
    sched.submit(Request(long2, GenParams(max_new_tokens=4, stop_on_eos=False), b))
    sched.submit(Request(doc, GenParams(max_new_tokens=4, stop_on_eos=False), rep, reference=entry))
    assert sched.replays(sched._inbox[2]) and not sched.replays(sched._inbox[0])
    sched.step()
    assert rep.tokens and not a.tokens and not b.tokens  # the repeat first; the long prompts are still in chunks
    assert rep.events[0][1].stats.recomputed_tokens == 0
    _run(sched, [])
    assert a.tokens == _reference_tokens(engine, long1, None, 4) and b.tokens == _reference_tokens(engine, long2, None, 4)
    assert rep.tokens == _reference_tokens(engine, doc, entry, 4)


@pytest.mark.parametrize("params", [dict(), dict(temperature=0.9, top_p=0.8, seed=7)], ids=["greedy", "seeded"])
def test_a_replay_sends_its_first_token_at_submit(params):
    """``early_first_token``: an identical repeat's first token leaves from ``submit`` (no step
    has run), then ``prefilled`` and the rest; the tokens are the ones the replay gives without
    it, greedy or seeded. A request that does not replay keeps the usual order."""
    engine = tiny_engine("llama")
    doc = _ids(engine, 100, 10)
    entry = engine.export_kv(engine.prefill(doc))
    other = _ids(engine, 0, 6)
    sched = Scheduler(engine, SchedulerConfig(max_running=4))
    early, usual, miss = Collector(), Collector(), Collector()
    gen = GenParams(max_new_tokens=6, stop_on_eos=False, **params)
    sched.submit(Request(doc, gen, early, reference=entry, early_first_token=True))
    assert [e[0] for e in early.events] == ["token"]  # before any step
    sched.submit(Request(doc, gen, usual, reference=entry))
    sched.submit(Request(other, gen, miss, reference=entry, early_first_token=True))  # a hit, not a replay
    assert usual.events == [] and miss.events == []
    _run(sched, [])
    assert [e[0] for e in early.events][:3] == ["token", "prefilled", "token"]
    assert early.tokens == usual.tokens and len(early.tokens) == 6
    assert [e[0] for e in miss.events][:2] == ["prefilled", "token"]
    assert early.finished == "length"
    assert sched.reserved_bytes == 0 and not sched.running


def test_an_early_first_token_that_ends_the_request_finishes_it_at_the_prefill():
    engine = tiny_engine("llama")
    doc = _ids(engine, 100, 10)
    entry = engine.export_kv(engine.prefill(doc))
    sched = Scheduler(engine, SchedulerConfig(max_running=2))
    one = Collector()
    sched.submit(Request(doc, GenParams(max_new_tokens=1, stop_on_eos=False), one, reference=entry,
                         early_first_token=True))
    _run(sched, [])
    assert [e[0] for e in one.events] == ["token", "prefilled", "finished"] and one.finished == "length"
    assert sched.reserved_bytes == 0 and not sched.running and not sched.prefilling


def test_an_early_first_token_comes_from_the_identical_one_of_several_sources():
    engine = tiny_engine("llama")
    doc, other = _ids(engine, 100, 10), _ids(engine, 300, 10)
    entry, other_entry = engine.export_kv(engine.prefill(doc)), engine.export_kv(engine.prefill(other))
    sched = Scheduler(engine, SchedulerConfig(max_running=2))
    early, usual = Collector(), Collector()
    gen = GenParams(max_new_tokens=5, stop_on_eos=False)
    sched.submit(Request(doc, gen, early, sources=[other_entry, entry], early_first_token=True))
    assert [e[0] for e in early.events] == ["token"]
    sched.submit(Request(doc, gen, usual, reference=entry))
    _run(sched, [])
    assert early.tokens == usual.tokens == _reference_tokens(engine, doc, entry, 5)
    assert early.events[1][0] == "prefilled" and early.events[1][1].stats.recomputed_tokens == 0


def _prefill_steps_of(sched, requests) -> list[int]:
    for r in requests:
        sched.submit(r)
    per_step = []
    while sched.has_work() or sched._inbox:
        per_step.append(sched.step().prefill_tokens)
    return per_step


def test_a_full_prefill_on_an_idle_scheduler_runs_in_one_piece_like_generate():
    """Nothing running or waiting: a prompt up to idle_prefill_tokens is prefilled in one unit,
    the same forward as a plain prefill (logits equal), not in prefill_chunk chunks."""
    engine = tiny_engine("llama")
    ids = _ids(engine, 0, 14)
    assert ids.size > 32
    got = []
    sched = Scheduler(engine, SchedulerConfig(max_step_tokens=32, prefill_chunk=32, idle_prefill_tokens=int(ids.size)))
    sink = Collector()
    per_step = _prefill_steps_of(sched, [Request(ids, GenParams(max_new_tokens=3, stop_on_eos=False),
                                                 lambda ev: (got.append(ev[1]) if ev[0] == "prefilled" else None,
                                                             sink(ev)))])
    assert [t for t in per_step if t] == [ids.size]
    assert torch.equal(got[0].logits, engine.prefill(ids).logits)
    # longer than the cap, or with the cap at 0: chunks again
    for cap in (int(ids.size) - 1, 0):
        sched = Scheduler(engine, SchedulerConfig(max_step_tokens=32, prefill_chunk=32, idle_prefill_tokens=cap))
        per_step = _prefill_steps_of(sched, [Request(ids, GenParams(max_new_tokens=3, stop_on_eos=False), Collector())])
        assert max(per_step) <= 32 and sum(per_step) == ids.size


def test_a_full_prefill_next_to_a_running_stream_still_goes_in_chunks():
    engine = tiny_engine("llama")
    short, long_ = _ids(engine, 100, 3), _ids(engine, 0, 14)
    sched = Scheduler(engine, SchedulerConfig(max_step_tokens=32, prefill_chunk=32, idle_prefill_tokens=4096))
    first = Collector()
    sched.submit(Request(short, GenParams(max_new_tokens=40, stop_on_eos=False), first))
    while not sched.running:
        sched.step()
    per_step = _prefill_steps_of(sched, [Request(long_, GenParams(max_new_tokens=2, stop_on_eos=False), Collector())])
    assert max(per_step) <= 32 + 1 and sum(per_step) >= long_.size                 # chunks, decodes in between
    assert first.finished == "length" and len(first.tokens) == 40


def test_idle_prefill_tokens_is_validated():
    with pytest.raises(ValueError, match="idle_prefill_tokens"):
        SchedulerConfig(idle_prefill_tokens=-1)
