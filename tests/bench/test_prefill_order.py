"""The prefill-order benchmark on a tiny model: both orders run the same burst, and replays first
gives the repeats their first token before the variants' (what the scheduler's order is for)."""
from __future__ import annotations

from benchmarks.prefill_order import markdown, run


def test_both_orders_run_and_replays_first_serves_repeats_first():
    from tests.unit.tiny import tiny_engine

    res = run(tiny_engine("llama"), rounds=2, docs=2, length=120, variants=2, new_tokens=3, seed=0)
    assert res["burst"]["requests"] == 6 and len(res["per_round"]) == 4
    fifo, first = res["summary"]["fifo"], res["summary"]["replays_first"]
    assert first["ttft_repeat_s"]["max"] <= first["ttft_variant_s"]["min"]
    assert fifo["tokens_per_s"]["median"] > 0
    res.update(name="t", model="tiny", conditions="test")
    assert "| replays_first |" in markdown(res)
