"""The compiled full prefill (``compile_prefill``) against the eager one.

Tiny fp32 Llama and Mistral (a sliding window shorter than the prompt), compiled with
``compile_prefill="on"``: one-piece and chunked prefills give the eager logits and KV, the
greedy continuation is the same, a compile failure falls back to the eager prefill without
appending twice, and a failure while running is raised.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from semshare_core import SemShareEngine
from semshare_core.compiled_common import compiler_available
from semshare_core.compiled_prefill import CompiledPrefill
from semshare_core.prefill import full_prefill

from .test_batch_decode import _ids
from .tiny import tiny_engine


needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")


@pytest.fixture(scope="module", params=["llama", "mistral"])
def engines(request):
    """(compiled engine, eager engine) sharing one tiny model; the compiled one is warmed."""
    base = tiny_engine(request.param, sliding_window=24 if request.param == "mistral" else None)
    compiled = SemShareEngine(base.model, base.tokenizer, base.config, compile_prefill="on")
    assert compiled.warm_compiled_prefill() is not None
    assert compiled.compiled_prefill.failed is None, compiled.compiled_prefill.failed
    return compiled, base


def _same(a, b):
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    assert len(a.keys) == len(b.keys)
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values):
        assert ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_one_piece_and_chunked_prefills_match_eager(engines):
    eng, eager = engines
    ids = _ids(eng, 200, 12)
    assert ids.size > 40  # longer than Mistral's window: its mask is in play
    n0 = eng.compiled_prefill.compiled_chunks
    _same(eng.prefill(ids), eager.prefill(ids))
    assert eng.compiled_prefill.compiled_chunks == n0 + 1
    chunked = eng.prefill(ids, chunk=16)
    _same(chunked, eager.prefill(ids))
    assert chunked.exact and eng.compiled_prefill.compiled_chunks >= n0 + 1 + ids.size // 16


@needs_compiler
def test_greedy_continuation_matches_eager(engines):
    eng, eager = engines
    ids = _ids(eng, 300, 6)
    assert eng.generate(ids, max_new_tokens=12, stop_on_eos=False)[0] == \
        eager.generate(ids, max_new_tokens=12, stop_on_eos=False)[0]


def test_a_one_token_chunk_and_the_library_default_stay_eager():
    eng = tiny_engine("llama")
    assert eng.compiled_prefill is None  # the library default is off
    cp = CompiledPrefill(eng.model)
    with torch.inference_mode():
        logits, cache = cp.forward(torch.tensor([5]))
        want, _ = full_prefill(eng.model, torch.tensor([5]))
    assert torch.equal(logits, want) and cp.compiled_chunks == 0 and cache.get_seq_length() == 1


def test_a_compile_failure_falls_back_to_the_eager_prefill(caplog):
    eng = tiny_engine("llama")
    cp = CompiledPrefill(eng.model)

    def broken(ids, pos):
        raise RuntimeError("no C++ compiler here")

    cp._fn = broken
    ids = torch.from_numpy(_ids(eng, 0, 4))
    with caplog.at_level(logging.WARNING, logger="semshare_core.compiled_prefill"), torch.inference_mode():
        logits, cache = cp.forward(ids[:10])
        logits, cache = cp.forward(ids[10:], cache)
        want, wcache = full_prefill(eng.model, ids)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == wcache.get_seq_length() == ids.numel()  # every row appended once
    assert cp.failed and "no C++ compiler" in cp.failed and not cp.active
    assert "prefilling eagerly" in caplog.text


def test_a_failure_while_running_is_raised_not_retried():
    from semshare_core import compiled_prefill

    eng = tiny_engine("llama")
    cp = CompiledPrefill(eng.model)

    def fails_midway(ids, pos):
        compiled_prefill._STATE.touched = True  # as after the first layer appended its rows
        raise RuntimeError("kernel failed")

    cp._fn = fails_midway
    with pytest.raises(RuntimeError, match="kernel failed"), torch.inference_mode():
        cp.forward(torch.from_numpy(_ids(eng, 0, 3)))
    assert cp.active


@needs_compiler
def test_one_graph_serves_every_chunk_length_after_the_warm_up(engines):
    """Prompts longer than the pre-packed linears' row limit (64), one piece or chunked, and
    ids made in or out of inference mode: no recompile after the warm-up."""
    from torch._dynamo.utils import counters

    eng, _ = engines
    graphs = counters["stats"]["unique_graphs"]
    ids = _ids(eng, 0, 30)
    assert ids.size > 130
    eng.prefill(ids[:70])
    eng.prefill(ids)
    eng.prefill(ids, chunk=48)
    with torch.inference_mode():
        eng.compiled_prefill.forward(torch.from_numpy(ids[:33]))
    assert counters["stats"]["unique_graphs"] == graphs


@needs_compiler
def test_bf16_with_prepacked_linears_compiles_once_for_every_length_and_batch():
    """bf16 on the CPU, where the linears are pre-packed (their eager forward branches on the
    row count): after the warm-up, neither longer prompts (one piece or chunked) nor larger
    batches recompile."""
    from torch._dynamo.utils import counters

    base = tiny_engine("llama")
    model = copy.deepcopy(base.model).to(torch.bfloat16)  # a copy: tiny models are shared between tests
    eng = SemShareEngine(model, base.tokenizer, base.config, compile_prefill="on",
                         compile_decode="on")
    if not eng.prepacked:
        pytest.skip("no bf16 oneDNN here: the linears are not pre-packed")
    eng.warm_compiled_prefill()
    eng.warm_compiled_decode()
    assert eng.compiled_prefill.active and eng.compiled_decode.active
    graphs = counters["stats"]["unique_graphs"]
    ids = _ids(eng, 0, 30)
    eng.prefill(ids)
    eng.prefill(ids, chunk=70)
    seqs = [eng.decode_state(eng.prefill(_ids(eng, i, 1)[:6])) for i in range(70)]
    with torch.inference_mode():
        eng.decode_step(seqs, [5] * 70)
    assert counters["stats"]["unique_graphs"] == graphs
