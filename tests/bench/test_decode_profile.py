"""The decode profile's op classification (no model needed) and one tiny measured run."""
from __future__ import annotations

from benchmarks.decode_profile import classify, markdown, measure


def test_classify_shares_add_up_and_sort_ops():
    s = classify([("mkldnn::_linear_pointwise", 60.0), ("aten::mm", 10.0),
                  ("aten::_scaled_dot_product_flash_attention_for_cpu", 20.0), ("aten::copy_", 5.0),
                  ("aten::mul", 5.0)])
    assert s == {"linear": 0.7, "attention": 0.2, "kv_append": 0.05, "other": 0.05}


def test_measure_runs_the_batched_step_on_a_tiny_model():
    from tests.unit.tiny import tiny_engine

    r = measure(tiny_engine("llama"), context=20, batch=3, steps=2, rounds=2)
    assert r["batch"] == 3 and r["step_ms"] > 0 and abs(sum(r["shares"].values()) - 1) < 0.01
    md = markdown({"name": "t", "model": "m", "dtype": "float32", "threads": 1, "prepacked": 0, "machine": "x",
                   "loadavg": [], "steps": 2, "rounds": 2, "runs": [r]})
    assert "| 20 | 3 |" in md
