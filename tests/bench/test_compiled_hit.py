"""The compiled-hit benchmark's measurement on a tiny model (all three arms run, ratios and
logit differences reported, the engine's compiled layers restored)."""
from __future__ import annotations

import pytest

from benchmarks.compiled_hit import markdown, measure
from semshare_core.compiled_common import compiler_available


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")
def test_measure_times_three_arms_and_compares_the_hits():
    from semshare_core import SemShareEngine
    from tests.unit.test_multisource import _rag
    from tests.unit.tiny import tiny_engine

    eager = tiny_engine("llama")
    eng = SemShareEngine(eager.model, eager.tokenizer, eager.config, compile_prefill="on")
    ids, refs = _rag(eager)
    compiled = eng.compiled_selective
    n0 = compiled.compiled_layers
    r = measure(eng, ids, refs, rounds=3)
    assert eng.compiled_selective is compiled and compiled.active
    assert compiled.compiled_layers == n0 + 4 * eng.num_layers  # the untimed run and 3 rounds, every layer
    assert r["hit"] and all(len(v) == 3 for v in r["per_round"].values())
    for k in ("speedup_eager_hit", "speedup_compiled_hit", "compiled_over_eager_hit"):
        assert r[k]["range"][0] <= r[k]["median"] <= r[k]["range"][1]
    assert r["same_argmax"] and r["logit_max_abs_diff"] < 1e-3  # fp32: the same hit
    md = markdown({"name": "t", "model": "m", "dtype": "float32", "threads": 1, "machine": "x", "rounds": 3,
                   "seed": 0, "loadavg": [], "compile_s": 1.0, "runs": [{**r, "sources": 3}]})
    assert f"| {ids.size} | 3 |" in md and "full / compiled hit" in md
