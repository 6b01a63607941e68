"""The benchmark's methods on a tiny float32 model: the block prefix cache and the quality probes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.methods import (MethodSpec, flop_proxy, fork, make_reference, method_specs, resolve_config,
                                reusable_prefix, run_method, teacher_force)
from semshare_core.config import SemShareConfig
from semshare_core.engine import PrefillStats, SemShareEngine
from semshare_core.models import tiny_random


@pytest.fixture(scope="module")
def eng():
    torch.manual_seed(0)
    lm = tiny_random("llama", dtype="float32")
    return SemShareEngine(lm.model, lm.tokenizer, SemShareConfig())


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(5, 500, size=90).astype(np.int64)


def test_reusable_prefix_rounds_down_to_blocks():
    a = np.arange(100)
    b = a.copy()
    b[37] = -1
    assert reusable_prefix(b, a, 16) == (37, 32)
    b = a.copy()
    b[15] = -1
    assert reusable_prefix(b, a, 16) == (15, 0)          # less than one block: no reuse
    assert reusable_prefix(a, a, 16) == (100, 96)        # identical: the last token still runs (99 -> 96)
    assert reusable_prefix(a[:64], a, 16) == (64, 48)    # 63 usable -> 3 blocks
    assert reusable_prefix(b, a, 1) == (15, 15)


@pytest.mark.parametrize("edit_at, block, reused", [(50, 16, 48), (40, 16, 32), (40, 8, 40), (10, 16, 0)])
def test_prefix_reuse_is_exact(eng, ids, edit_at, block, reused):
    var = ids.copy()
    var[edit_at] = (var[edit_at] + 1) % 500
    for placement in ("host", "bytes"):
        ref = make_reference(eng, ids, placement)
        pre, first, ttft, timings = run_method(eng, var, ref, "prefix", eng.config, block)
        full = eng.prefill(var)
        assert pre.stats.reused_tokens == reused and pre.stats.hit == (reused > 0)
        assert pre.stats.mapping["common_prefix"] == edit_at
        assert pre.stats.rows_per_layer == [var.size - reused] * eng.num_layers
        torch.testing.assert_close(pre.logits, full.logits, rtol=1e-4, atol=1e-4)
        assert first == int(torch.argmax(full.logits))
        assert (timings["fetch_ms"] > 0) == (placement == "bytes")
        # decoding on the prefix cache continues exactly like the full prefill
        toks, _, nll = teacher_force(eng, pre, 4)
        toks_f, _, nll_f = teacher_force(eng, full, 4)
        assert toks == toks_f and nll == pytest.approx(nll_f, rel=1e-4, abs=1e-4)


def test_teacher_force_on_own_greedy_agrees(eng, ids):
    pre = eng.prefill(ids)
    toks, argmaxes, nll = teacher_force(eng, fork(pre), 5)
    assert toks == argmaxes and nll > 0
    # forcing a different continuation: argmax is still recorded, NLL grows
    other = [(t + 1) % 500 for t in toks]
    forced, am2, nll2 = teacher_force(eng, pre, 5, other)
    assert forced == other and am2[0] == argmaxes[0] and nll2 > nll


def test_fork_leaves_the_original_cache(eng, ids):
    pre = eng.prefill(ids)
    before = [layer.keys.shape[2] for layer in pre.cache.layers]
    teacher_force(eng, fork(pre), 3)
    assert [layer.keys.shape[2] for layer in pre.cache.layers] == before


def test_flop_proxy_counts_probe_rows():
    st = PrefillStats(prompt_tokens=10, rows_per_layer=[10, 4, 4, 2])
    assert flop_proxy(st, 10, 4) == pytest.approx(20 / 40)
    st.probe_rows = 6  # the engine may add this field: rows a hit computes beyond rows_per_layer
    assert flop_proxy(st, 10, 4) == pytest.approx(26 / 40)


def test_method_specs_and_overrides():
    specs = method_specs(0.5, (0.3,), {"attn": {"recompute_ratio": 0.15}})
    assert specs["semshare"].overrides == {} and specs["semshare_r1"].overrides == {"recompute_ratio": 1.0}
    assert specs["semshare_ret0.3"].group == "memory" and specs["attn"].group == "sweep"
    base = SemShareConfig()
    assert resolve_config(base, specs["semshare"]) is base
    assert resolve_config(base, specs["semshare_pruned"]).retention == 0.5
    with pytest.raises(ValueError, match="nope"):
        resolve_config(base, MethodSpec("x", "semshare", {"nope": 1}))
    with pytest.raises(ValueError, match="only semshare"):
        MethodSpec("y", "prefix", {"recompute_ratio": 0.1})
