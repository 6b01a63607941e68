"""The compiled-prefill benchmark's measurement on a tiny model (both arms run, ratios and
logit differences reported)."""
from __future__ import annotations

import pytest

from benchmarks.compiled_prefill import markdown, measure
from semshare_core.compiled_common import compiler_available


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")
def test_measure_times_both_arms_and_compares_their_logits():
    from semshare_core import SemShareEngine
    from tests.unit.test_batch_decode import _ids
    from tests.unit.tiny import tiny_engine

    eager = tiny_engine("llama")
    compiled = SemShareEngine(eager.model, eager.tokenizer, eager.config, compile_prefill="on")
    ids = _ids(eager, 200, 8)
    runs = [measure(eager, compiled, ids, chunk, rounds=3) for chunk in (None, 16)]
    assert compiled.compiled_prefill.active and compiled.compiled_prefill.compiled_chunks >= 3 + 3 * (ids.size // 16)
    for r in runs:
        assert len(r["per_round"]["eager"]) == len(r["per_round"]["compiled"]) == 3
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        assert r["same_argmax"] and r["logit_max_abs_diff"] < 1e-3  # fp32: the same prefill
    md = markdown({"name": "t", "model": "m", "dtype": "float32", "threads": 1, "machine": "x", "rounds": 3,
                   "loadavg": [], "compile_s": 1.0, "runs": runs})
    assert f"| {ids.size} | one piece |" in md and f"| {ids.size} | 16 |" in md
