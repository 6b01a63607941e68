"""The decode profile's op classification (no model needed) and one tiny measured run."""
from __future__ import annotations

import pytest

from benchmarks.decode_profile import classify, kv_bytes, markdown, measure, weight_bytes
from semshare_core.compiled_common import compiler_available


def test_classify_shares_add_up_and_sort_ops():
    s = classify([("mkldnn::_linear_pointwise", 60.0), ("aten::mm", 10.0),
                  ("aten::_scaled_dot_product_flash_attention_for_cpu", 20.0), ("aten::copy_", 5.0),
                  ("aten::mul", 5.0)])
    assert s == {"linear": 0.7, "attention": 0.2, "kv_append": 0.05, "other": 0.05}
    native = classify([("mkldnn::_linear_pointwise", 50.0), ("semshare::decode_attention", 50.0)])
    assert native["attention"] == 0.5  # the native kernel's profiler range counts as attention


def test_measure_runs_the_batched_step_on_a_tiny_model():
    from tests.unit.tiny import tiny_engine

    runs = measure(tiny_engine("llama"), context=20, batch=3, steps=2, rounds=2, kernels={"sdpa": None})
    assert [x["attention_impl"] for x in runs] == ["sdpa"]
    r = runs[0]
    assert r["batch"] == 3 and r["step_ms"] > 0 and abs(sum(r["shares"].values()) - 1) < 0.01
    md = markdown({"name": "t", "model": "m", "dtype": "float32", "threads": 1, "prepacked": 0, "machine": "x",
                   "loadavg": [], "steps": 2, "rounds": 2, "runs": [r]})
    assert "| sdpa | 20 | 3 |" in md
    eng = tiny_engine("llama")
    r["kv_mb"] = round(kv_bytes(eng, 20, 3) / 1e6, 4)
    assert weight_bytes(eng.model) > 0 and r["kv_mb"] > 0 and r["linear_ms"] >= 0
    md = markdown({"name": "t", "model": "m", "dtype": "float32", "threads": 1, "prepacked": 0, "machine": "x",
                   "loadavg": [], "steps": 2, "rounds": 2, "runs": [r], "read_gbs": 5.0, "weight_mb": 1.0})
    assert "weights GB/s" in md


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")
def test_a_compiled_arm_is_timed_beside_the_eager_one_with_per_round_ratios():
    from semshare_core.compiled_decode import CompiledDecode
    from tests.unit.tiny import tiny_engine

    eng = tiny_engine("llama")
    compiled = CompiledDecode(eng.model)
    runs = measure(eng, context=20, batch=3, steps=2, rounds=3, kernels={"sdpa": None, "sdpa+compiled": None},
                   compiled=compiled)
    assert [r["attention_impl"] for r in runs] == ["sdpa", "sdpa+compiled"]
    assert compiled.active and compiled.compiled_steps >= 3 * 2
    assert all(len(r["per_round_ms"]) == 3 for r in runs)
    md = markdown({"name": "t", "model": "m", "dtype": "float32", "threads": 1, "prepacked": 0, "machine": "x",
                   "loadavg": [], "steps": 2, "rounds": 3, "runs": runs, "compile_s": 1.0})
    assert "| context | batch | sdpa+compiled / sdpa |" in md and "| 20 | 3 | " in md
    assert "compiled in 1.0 s" in md
