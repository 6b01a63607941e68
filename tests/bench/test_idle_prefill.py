"""The idle-prefill benchmark on a tiny model: both configs answer every request, one piece
takes one step where chunks take several, and the table is written."""
from __future__ import annotations

import math

from benchmarks.idle_prefill import markdown, run


def test_one_piece_takes_one_step_and_chunks_take_several():
    from tests.unit.tiny import tiny_engine

    res = run(tiny_engine("llama"), lengths=[100], rounds=2, prefill_chunk=32)
    assert len(res["per_round"]) == 2
    for row in res["per_round"]:
        assert row["one_piece"]["end"] == row["chunked"]["end"] == "finished"
        assert row["one_piece"]["steps"] == 1
        assert row["chunked"]["steps"] >= math.ceil(100 / 32)
    s = res["summary"]["100"]
    assert s["ttft_ratio"]["n"] == 2 and s["one_piece_cpu_s"]["median"] > 0
    res.update(name="t", model="tiny", conditions="test")
    assert "\n| 100 |" in markdown(res)
