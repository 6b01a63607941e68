"""The compiled batched decode step (``compile_decode``) against the eager one.

Tiny fp32 Llama and Mistral (sliding window), compiled with ``compile_decode="on"``:
teacher-forced logits and caches match the eager :func:`batch_step` while requests join and
leave (hits, pruned caches, mixed lengths, a batch of one in between); the scheduler's
greedy tokens match an eager engine's; a compile failure falls back to eager steps without
touching a cache twice; a failure while running is raised, not retried.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from semshare_core import SemShareEngine
from semshare_core.batch import GROW_ROWS, batch_step
from semshare_core.compiled_common import compiler_available
from semshare_core.compiled_decode import CompiledDecode, wanted
from semshare_core.scheduler import GenParams, Request, Scheduler, SchedulerConfig

from .test_batch_decode import Collector, _ids
from .tiny import tiny_engine


needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")


@pytest.fixture(scope="module", params=["llama", "mistral"])
def engines(request):
    """(compiled engine, eager engine) sharing one tiny model; the compiled one is warmed."""
    base = tiny_engine(request.param, sliding_window=24 if request.param == "mistral" else None)
    compiled = SemShareEngine(base.model, base.tokenizer, base.config, compile_decode="on")
    assert compiled.warm_compiled_decode() is not None
    assert compiled.compiled_decode.failed is None, compiled.compiled_decode.failed
    return compiled, base


def _states(engine, prompts, reference=None, retention=1.0):
    cfg = engine.config.with_(retention=retention)
    return [engine.decode_state(engine.prefill(p, reference, cfg)) for p in prompts]


@needs_compiler
def test_teacher_forced_logits_and_caches_match_eager_while_requests_join_and_leave(engines):
    eng, eager = engines
    doc = _ids(eng, 100, 14)
    ref = eng.export_kv(eng.prefill(doc))
    variant = np.concatenate([_ids(eng, 100, 6)[:-3], _ids(eng, 300, 2), _ids(eng, 107, 6)])
    live = _states(eng, [_ids(eng, 0, 3), _ids(eng, 10, 9)]) + _states(eng, [variant], ref, retention=0.5)
    assert any(s.sparse for s in live)  # a pruned hit's cache is in the batch
    twins = [copy.deepcopy(s) for s in live]
    joins = {3: _states(eng, [_ids(eng, 40, 1)]), 5: _states(eng, [doc], ref)}
    leaves = {4: 1, 7: 0, 8: 0, 9: 0}  # batch sizes 3, 4, 4, 5, 4, 3, 2, 1, 0: a lone request runs too
    steps0 = eng.compiled_decode.compiled_steps
    tokens = [7] * len(live)
    for step in range(10):
        if step in joins:
            live += joins[step]
            twins += [copy.deepcopy(s) for s in joins[step]]
            tokens += [9] * len(joins[step])
        if step in leaves and live:
            i = leaves[step]
            del live[i], twins[i], tokens[i]
        if not live:
            break
        with torch.inference_mode():
            got = eng.decode_step(live, tokens)
            want = batch_step(eager.model, twins, tokens, eager.decode_kernel)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1).tolist()
        for a, b in zip(live, twins):
            assert a.position == b.position and a.lengths == b.lengths
            for l in range(len(a.lengths)):
                n = a.lengths[l]
                torch.testing.assert_close(a.keys[l][:, :, :n], b.keys[l][:, :, :n], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(a.values[l][:, :, :n], b.values[l][:, :, :n], rtol=1e-4, atol=1e-4)
    assert eng.compiled_decode.compiled_steps - steps0 >= 6  # the multi-request steps ran compiled


@needs_compiler
def test_scheduler_greedy_tokens_match_an_eager_engine(engines):
    eng, eager = engines
    prompts = [_ids(eng, 0, 3), _ids(eng, 10, 9), _ids(eng, 40, 1), _ids(eng, 60, 5)]
    news = [12, 5, 16, 3]

    def run(engine):
        sched = Scheduler(engine, SchedulerConfig(max_running=8, max_step_tokens=64, prefill_chunk=32))
        sinks = [Collector() for _ in prompts]
        for p, n, s in zip(prompts, news, sinks):
            sched.submit(Request(p, GenParams(max_new_tokens=n, stop_on_eos=False), s))
        while sched.has_work() or sched._inbox:
            sched.step()
        return [s.tokens for s in sinks]

    steps0 = eng.compiled_decode.compiled_steps
    assert run(eng) == run(eager)
    assert eng.compiled_decode.compiled_steps > steps0


def test_modes():
    cpu = torch.device("cpu")
    assert not wanted("auto", cpu, torch.float32)  # fp32 keeps the eager step (the exact invariants)
    assert wanted("on", cpu, torch.float32) and not wanted("off", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="compile_decode"):
        wanted("fast", cpu, torch.bfloat16)
    assert tiny_engine("llama").compiled_decode is None  # the library default is off


def test_a_compile_failure_falls_back_to_eager_steps_once(caplog):
    eng = tiny_engine("llama")
    cd = CompiledDecode(eng.model)

    def broken(ids, pos):
        raise RuntimeError("no C++ compiler here")

    cd._fn = broken
    prompts = [_ids(eng, 0, 3), _ids(eng, 10, 9)]
    live, twins = _states(eng, prompts), _states(eng, prompts)
    with caplog.at_level(logging.WARNING, logger="semshare_core.compiled_decode"), torch.inference_mode():
        got = cd.step(live, [5, 6])
        want = batch_step(eng.model, twins, [5, 6])
    assert torch.equal(got, want)
    assert [s.lengths for s in live] == [s.lengths for s in twins]  # each row appended once
    assert [s.position for s in live] == [s.position for s in twins]
    assert cd.failed and "no C++ compiler" in cd.failed and not cd.active
    assert "decoding eagerly" in caplog.text


def test_a_failure_while_running_is_raised_not_retried():
    eng = tiny_engine("llama")
    cd = CompiledDecode(eng.model)
    live = _states(eng, [_ids(eng, 0, 3), _ids(eng, 10, 9)])

    def fails_midway(ids, pos):
        from semshare_core import batch

        batch._STATE.cache.touched = True  # as after the first layer's attention appended its rows
        raise RuntimeError("kernel failed")

    cd._fn = fails_midway
    with pytest.raises(RuntimeError, match="kernel failed"), torch.inference_mode():
        cd.step(live, [5, 6])
    assert cd.active


@needs_compiler
def test_one_graph_serves_every_batch_size_after_the_warm_up(engines):
    """Batches larger than the pre-packed linears' row limit (64) included: no recompile."""
    from torch._dynamo.utils import counters

    eng, _ = engines
    graphs = counters["stats"]["unique_graphs"]
    seqs = _states(eng, [_ids(eng, i, 1)[:6] for i in range(70)])
    with torch.inference_mode():
        for b in (70, 3, 17, 1):
            eng.decode_step(seqs[:b], [5] * b)
    assert counters["stats"]["unique_graphs"] == graphs


@needs_compiler
def test_a_lone_request_runs_the_graph_padded_to_two(engines):
    """A batch of one goes through the compiled graph with a placeholder request (no
    second compile): its logits and cache rows are the eager step's, and the placeholder
    is back to one row after every step, so it never grows."""
    from torch._dynamo.utils import counters

    eng, eager = engines
    graphs = counters["stats"]["unique_graphs"]
    (live,) = _states(eng, [_ids(eng, 5, 4)])
    twin = copy.deepcopy(live)
    padded0, tok = eng.compiled_decode.padded_steps, 7
    for _ in range(5):
        with torch.inference_mode():
            got = eng.decode_step([live], [tok])
            want = batch_step(eager.model, [twin], [tok], eager.decode_kernel)
        assert got.shape == want.shape == (1, want.shape[1])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tok = int(want.argmax(-1))
        assert live.position == twin.position and live.lengths == twin.lengths
        for l in range(len(live.lengths)):
            n = live.lengths[l]
            torch.testing.assert_close(live.keys[l][:, :, :n], twin.keys[l][:, :, :n], rtol=1e-4, atol=1e-4)
        pad = eng.compiled_decode._pad
        assert pad.lengths == [1] * len(pad.lengths) and pad.position == 1
        assert all(k.shape[2] == 1 + GROW_ROWS for k in pad.keys)
    assert eng.compiled_decode.padded_steps - padded0 == 5
    assert counters["stats"]["unique_graphs"] == graphs
