"""The model replica's warm-up (serve_app/warmup.py) on a tiny engine, no Ray: it runs the
full prefill, batched decode steps and the hit path through a real scheduler, and leaves
the scheduler's counters and step history as if nothing had run."""
from __future__ import annotations

import numpy as np
import pytest

from semshare_core.compiled_common import compiler_available
from semshare_core.scheduler import GenParams, Request, Scheduler, SchedulerConfig

from .tiny import tiny_engine


@pytest.fixture
def scheduler():
    s = Scheduler(tiny_engine("llama"), SchedulerConfig(max_running=4))
    s.start()
    yield s
    s.stop()


def test_warm_up_runs_every_path_and_leaves_no_trace(scheduler):
    from serve_app.warmup import WARMUP_DECODE_STEPS, WARMUP_MAX_TOKENS, warm_up, warmup_prompt

    engine = scheduler.engine
    rep = warm_up(engine, scheduler)
    assert rep.hit and rep.hit_error is None and rep.staging == "device"  # CPU: the reference's tensor
    assert 16 <= rep.prompt_tokens <= WARMUP_MAX_TOKENS and rep.prompt_tokens == warmup_prompt(engine).size
    assert rep.decode_steps == WARMUP_DECODE_STEPS
    assert 0 < rep.ms < 5000  # ~40 ms here; the brief's bound for tiny models is ~1 s
    st = scheduler.stats()
    assert all(v == 0 for k, v in scheduler.counters.items()), st
    assert len(scheduler.history) == 0 and st["running"] == st["waiting"] == st["reserved_bytes"] == 0
    d = rep.as_dict()
    assert d["ran"] is True and d["hit"] is True
    assert rep.compile_s is None and rep.compile_prefill_s is None  # the library default is off: nothing compiled


def test_reset_stats_refuses_while_requests_are_in_the_scheduler():
    s = Scheduler(tiny_engine("llama"))  # not started: the request stays queued
    s.submit(Request(np.arange(1, 20, dtype=np.int64), GenParams(max_new_tokens=1), lambda ev: None))
    with pytest.raises(RuntimeError):
        s.reset_stats()


def test_warmup_is_a_validated_setting():
    from pydantic import ValidationError

    from serve_app.settings import resolve_args

    assert resolve_args({"preset": "tiny-random"}).warmup is True
    assert resolve_args({"preset": "tiny-random", "warmup": False}).warmup is False
    with pytest.raises(ValidationError):
        resolve_args({"preset": "tiny-random", "warmup": "sometimes"})


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")
def test_warm_up_compiles_the_decode_step_first_where_it_is_on():
    from semshare_core import SemShareEngine
    from serve_app.warmup import warm_up

    base = tiny_engine("llama")
    engine = SemShareEngine(base.model, base.tokenizer, base.config, compile_decode="on", compile_prefill="on")
    s = Scheduler(engine, SchedulerConfig(max_running=4))
    s.start()
    try:
        rep = warm_up(engine, s)
    finally:
        s.stop()
    assert rep.compile_s is not None and rep.compile_s > 0 and rep.as_dict()["compile_s"] == rep.compile_s
    assert engine.compiled_decode.active and engine.compiled_decode.compiled_steps >= 2
    assert rep.compile_prefill_s is not None and rep.compile_prefill_s > 0
    assert engine.compiled_prefill.active and engine.compiled_prefill.compiled_chunks >= 2
    assert all(v == 0 for v in s.counters.values())  # the compile ran beside the scheduler, not through it


def test_compile_decode_is_a_validated_setting():
    from pydantic import ValidationError

    from serve_app.settings import resolve_args

    assert resolve_args({"preset": "tiny-random"}).compile_decode == "auto"
    assert resolve_args({"preset": "tiny-random", "compile_decode": "off"}).compile_decode == "off"
    assert resolve_args({"preset": "tiny-random"}).compile_prefill == "auto"
    with pytest.raises(ValidationError):
        resolve_args({"preset": "tiny-random", "compile_prefill": 1})
    with pytest.raises(ValidationError):
        resolve_args({"preset": "tiny-random", "compile_decode": "always"})
