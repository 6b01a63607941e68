"""The gather A/B benchmark's measurement on a tiny bf16 model (three arms timed, the two hits
bit-identical, the engine's kernel restored)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.gather_ab import markdown, measure
from semshare_core import gather_kernel


@pytest.mark.skipif(gather_kernel.load() is None, reason="no C compiler, or the kernel failed to build")
def test_measure_times_three_arms_and_the_hits_are_the_same():
    from semshare_core import SemShareConfig, SemShareEngine
    from semshare_core.models import tiny_random_model
    from tests.unit.test_multisource import _rag
    from tests.unit.tiny import tokenizer

    tok = tokenizer()
    model = tiny_random_model("llama", vocab_size=len(tok), hidden_size=128, dtype=torch.bfloat16)
    eng = SemShareEngine(model, tok, SemShareConfig(window=1, recompute_min_tokens=0))
    kernel = eng.gather_kernel
    assert kernel is not None
    ids, refs = _rag(eng)
    r = measure(eng, ids, refs, rounds=3)
    assert eng.gather_kernel is kernel
    assert r["hit"] and r["same_logits"] and all(len(v) == 3 for v in r["per_round"].values())
    for k in ("speedup_native", "speedup_torch", "torch_over_native"):
        assert r[k]["range"][0] <= r[k]["median"] <= r[k]["range"][1]
    assert r["hit_native_gather_ms"] > 0 and r["hit_torch_gather_ms"] > 0
    md = markdown({"name": "t", "model": "m", "dtype": "bfloat16", "threads": 1, "machine": "x", "rounds": 3,
                   "seed": 0, "loadavg": [], "compile_s": 0.0, "runs": [r]})
    assert f"| {ids.size} | 3 |" in md and "First logits bit-identical: 1/1" in md
