"""A hit's decoder layers compiled (``compile_prefill``) against the eager hit.

Tiny fp32 Llama and Mistral (a sliding window shorter than the prompt), compiled with
``compile_prefill="on"``: single- and several-source hits give the eager hit's logits, KV
and row counts; one graph serves every layer and every row count; pruning (which records
attention eagerly) and single rows stay eager; a compile failure falls back to the eager
layers, and a failure after the cache changed is raised.
"""
from __future__ import annotations

import logging

import pytest
import torch

from semshare_core import SemShareEngine
from semshare_core.compiled_common import compiler_available
from semshare_core.compiled_selective import CompiledSelective

from .test_batch_decode import _ids
from .test_multisource import _rag
from .tiny import tiny_engine

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")


@pytest.fixture(scope="module", params=["llama", "mistral"])
def engines(request):
    """(compiled engine, eager engine) sharing one tiny model; the compiled one is warmed."""
    base = tiny_engine(request.param, sliding_window=24 if request.param == "mistral" else None)
    compiled = SemShareEngine(base.model, base.tokenizer, base.config, compile_prefill="on")
    assert compiled.warm_compiled_prefill() is not None
    assert compiled.compiled_selective.failed is None, compiled.compiled_selective.failed
    assert compiled.compiled_selective.compiled_layers == base.num_layers  # the warm-up's hit
    return compiled, base


def _edited(eng, ids):
    out = ids.copy()
    out[len(out) // 3] = (int(out[len(out) // 3]) + 7) % (eng.signature.vocab_size - 2) + 1
    out[2 * len(out) // 3] = (int(out[2 * len(out) // 3]) + 11) % (eng.signature.vocab_size - 2) + 1
    return out


def _same_hit(a, b):
    assert a.stats.hit and b.stats.hit
    assert a.stats.rows_per_layer == b.stats.rows_per_layer
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values):
        torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_single_and_several_source_hits_match_the_eager_hit(engines):
    from torch._dynamo.utils import counters

    eng, eager = engines
    graphs = counters["stats"]["unique_graphs"]
    ids = _ids(eng, 40, 12)
    assert ids.size > 40  # longer than Mistral's window: its masks are in play
    ref = eager.export_kv(eager.prefill(ids))
    cfg = eng.config.with_(recompute_ratio=0.4)
    n0 = eng.compiled_selective.compiled_layers
    hit = eng.prefill(_edited(eng, ids), ref, cfg)
    _same_hit(hit, eager.prefill(_edited(eng, ids), ref, cfg))
    rows = hit.stats.rows_per_layer
    assert rows[0] == ids.size and len(set(rows)) > 1  # the row count changes across layers
    assert eng.compiled_selective.compiled_layers == n0 + eng.num_layers

    rag, refs = _rag(eager)
    _same_hit(eng.prefill_multi(rag, refs), eager.prefill_multi(rag, refs))
    assert counters["stats"]["unique_graphs"] == graphs  # every layer and row count: the warm-up's graph


@needs_compiler
def test_greedy_continuation_after_a_compiled_hit_matches_eager(engines):
    eng, eager = engines
    ids = _ids(eng, 70, 10)
    ref = eager.export_kv(eager.prefill(ids))
    edited = _edited(eng, ids)
    got = eng.generate(edited, ref, max_new_tokens=10, stop_on_eos=False)
    want = eager.generate(edited, ref, max_new_tokens=10, stop_on_eos=False)
    assert got[1].hit and got[0] == want[0]


@needs_compiler
def test_pruning_keeps_the_hit_eager(engines):
    eng, eager = engines
    ids = _ids(eng, 100, 10)
    ref = eager.export_kv(eager.prefill(ids))
    cfg = eng.config.with_(retention=0.5)
    n0 = eng.compiled_selective.compiled_layers
    a, b = eng.prefill(_edited(eng, ids), ref, cfg), eager.prefill(_edited(eng, ids), ref, cfg)
    assert eng.compiled_selective.compiled_layers == n0
    assert a.stats.retained_per_layer == b.stats.retained_per_layer
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_a_compile_failure_falls_back_to_the_eager_layers(caplog):
    eager = tiny_engine("llama")
    eng = SemShareEngine(eager.model, eager.tokenizer, eager.config, compile_prefill="on")

    def broken(*args):
        raise RuntimeError("no C++ compiler here")

    eng.compiled_selective._fn = broken
    eng.compiled_prefill.failed = "off for this test"  # the full prefill stays eager
    ids = _ids(eng, 0, 8)
    ref = eager.export_kv(eager.prefill(ids))
    with caplog.at_level(logging.WARNING, logger="semshare_core.compiled_selective"):
        got = eng.prefill(_edited(eng, ids), ref)
    want = eager.prefill(_edited(eng, ids), ref)
    assert got.stats.hit and got.stats.rows_per_layer == want.stats.rows_per_layer
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    cs = eng.compiled_selective
    assert cs.failed and "no C++ compiler" in cs.failed and not cs.active and cs.compiled_layers == 0
    assert "hits run eagerly" in caplog.text


def test_a_failure_after_the_cache_changed_is_raised_not_retried():
    from semshare_core import compiled_selective

    eager = tiny_engine("llama")
    eng = SemShareEngine(eager.model, eager.tokenizer, eager.config, compile_prefill="on")

    def fails_midway(*args):
        compiled_selective._STATE.touched = True  # as after the op wrote the rows' K/V
        raise RuntimeError("kernel failed")

    eng.compiled_selective._fn = fails_midway
    eng.compiled_prefill.failed = "off for this test"
    ids = _ids(eng, 0, 8)
    ref = eager.export_kv(eager.prefill(ids))
    with pytest.raises(RuntimeError, match="kernel failed"):
        eng.prefill(_edited(eng, ids), ref)
    assert eng.compiled_selective.active


def test_a_single_row_runs_eagerly():
    eng = tiny_engine("llama")
    cs = CompiledSelective(eng.model)

    def never(*args):
        raise AssertionError("a single row must not reach the graph")

    cs._fn = never
    assert cs.layer(None, 0, torch.zeros(1, 1, 8), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)), None, None) is None
    assert cs.active and cs.compiled_layers == 0
