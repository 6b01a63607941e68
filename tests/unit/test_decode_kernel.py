"""The native decode-attention kernel (bf16, AVX512-BF16): the same attention as SDPA within
bf16 rounding, batch-invariant, and a clean fallback to SDPA where it cannot be built."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semshare_core import SemShareConfig, SemShareEngine, decode_kernel
from semshare_core.batch import SeqKV, batch_step
from semshare_core.models import tiny_random_model
from semshare_core.scheduler import Scheduler, SchedulerConfig

from .test_batch_decode import _ids, run_plan
from .tiny import tokenizer

KERNEL = decode_kernel.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"native decode attention unavailable here: "
                                  f"{decode_kernel.unavailable_reason() or 'build failed'}")


def _reference(q, keys, values, starts, lengths, scale):
    """fp64 attention of request i's query ``q[0, :, i]`` over rows [start, length)."""
    outs = []
    for i, (k, v, a, n) in enumerate(zip(keys, values, starts, lengths)):
        g = q.shape[1] // k.shape[1]
        kk = k[0, :, a:n].double().repeat_interleave(g, 0)        # [Hq, m, D]
        vv = v[0, :, a:n].double().repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hmd->hm", q[0, :, i].double(), kk) * scale, -1)
        outs.append(torch.einsum("hm,hmd->hd", p, vv))              # [Hq, D]
    return torch.stack(outs)[None]                                  # [1, B, Hq, D]


@needs_kernel
@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (4, 128), (7, 64), (8, 128)])
def test_kernel_equals_attention_within_bf16_rounding(group, head_dim):
    g = torch.Generator().manual_seed(group * 100 + head_dim)
    kv_heads = 2
    lengths = [1, 15, 16, 17, 100, 300]
    starts = [0, 0, 3, 0, 40, 0]                                    # a window cuts some requests' first rows
    caps = [n + 7 * i for i, n in enumerate(lengths)]               # buffers with spare rows, as SeqKV keeps
    keys = [torch.randn(1, kv_heads, c, head_dim, generator=g).to(torch.bfloat16) for c in caps]
    values = [torch.randn(1, kv_heads, c, head_dim, generator=g).to(torch.bfloat16) for c in caps]
    q = torch.randn(1, kv_heads * group, len(lengths), head_dim, generator=g).to(torch.bfloat16)
    scale = head_dim ** -0.5
    assert KERNEL.handles(q, keys[0])
    out = KERNEL.attend(q, keys, values, starts, lengths, scale)
    assert out.shape == (1, len(lengths), kv_heads * group, head_dim) and out.dtype == torch.bfloat16
    want = _reference(q, keys, values, starts, lengths, scale)
    torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=2e-3)
    # and SDPA on the same bf16 inputs lands as close
    sdpa = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, a:n], v[:, :, a:n], scale=scale,
                                                     enable_gqa=group > 1)
                      for i, (k, v, a, n) in enumerate(zip(keys, values, starts, lengths))], 2).transpose(1, 2)
    assert (out.double() - want).abs().max() <= 2 * (sdpa.double() - want).abs().max() + 1e-3


@needs_kernel
def test_kernel_refuses_what_it_does_not_handle():
    q = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)               # head_dim 32
    k = torch.zeros(1, 2, 8, 32, dtype=torch.bfloat16)
    assert not KERNEL.handles(q, k)
    assert not KERNEL.handles(q.float(), k.float())
    q64, k64 = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert KERNEL.handles(q64, k64)
    strided = torch.zeros(1, 2, 8, 128, dtype=torch.bfloat16)[..., :64]  # not contiguous: refused, not misread
    assert KERNEL.attend(q64, [strided], [strided], [0], [8], 0.125) is None


def _bf16_engine(arch: str, mode: str, sliding_window=None) -> SemShareEngine:
    tok = tokenizer()
    model = tiny_random_model(arch, vocab_size=len(tok), hidden_size=384, heads=6, kv_heads=2, layers=3,
                              dtype="bfloat16", seed=11, sliding_window=sliding_window)  # head_dim 64, 3 per group
    return SemShareEngine(model, tok, SemShareConfig(window=1, recompute_min_tokens=0), decode_attention=mode)


@needs_kernel
@pytest.mark.parametrize("arch,window", [("llama", None), ("mistral", 24)])
def test_native_batched_decode_equals_batch_one(arch, window):
    """Hits (pruned) and misses of mixed lengths, joining and leaving: each request's tokens
    are those it gets decoding alone, with the kernel in both."""
    engine = _bf16_engine(arch, "native", window)
    assert engine.decode_kernel is not None
    cfg = engine.config.with_(retention=0.5)
    doc = _ids(engine, 100, 14)
    ref = engine.export_kv(engine.prefill(doc))
    variant = np.asarray(_ids(engine, 100, 6)[:-3].tolist() + _ids(engine, 300, 2).tolist()
                         + _ids(engine, 107, 6).tolist(), dtype=np.int64)
    plan = [(_ids(engine, 0, 3), None, 12, 0), (_ids(engine, 10, 9), None, 6, 0), (variant, ref, 10, 0),
            (_ids(engine, 40, 1), None, 14, 2), (_ids(engine, 60, 5), None, 4, 5)]
    sched = Scheduler(engine, SchedulerConfig(max_running=8, max_step_tokens=64, prefill_chunk=32))
    sinks, sizes = run_plan(sched, plan, cfg)
    assert max(sizes) >= 3, sizes
    for (ids, r, n, _), sink in zip(plan, sinks):
        alone = list(engine.decode(engine.prefill(ids, r, cfg), max_new_tokens=n, stop_on_eos=False))
        assert sink.tokens == alone


@needs_kernel
def test_native_decode_logits_stay_within_bf16_rounding_of_sdpa():
    """Teacher-forced: the same tokens fed to both attentions give logits as close as two
    bf16 roundings of one computation."""
    native, sdpa = _bf16_engine("llama", "native"), _bf16_engine("llama", "sdpa")
    assert native.decode_kernel is not None and sdpa.decode_kernel is None
    ids = _ids(native, 0, 8)
    worst = 0.0
    with torch.inference_mode():
        seqs = {e: [e.decode_state(e.prefill(ids))] for e in (native, sdpa)}
        for tok in _ids(native, 50, 2)[:20].tolist():
            a = batch_step(native.model, seqs[native], [tok], native.decode_kernel)
            b = batch_step(sdpa.model, seqs[sdpa], [tok], None)
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    assert worst < 0.03, worst


def test_modes_resolve_and_fail_clearly(monkeypatch):
    assert decode_kernel.resolve("sdpa", torch.device("cpu"), torch.bfloat16) is None
    assert decode_kernel.resolve("auto", torch.device("cpu"), torch.float32) is None  # fp32: SDPA, exact
    with pytest.raises(ValueError, match="must be one of"):
        decode_kernel.resolve("flash", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 on a CPU"):
        decode_kernel.resolve("native", torch.device("cpu"), torch.float32)
    # a machine where it cannot be built: auto falls back to SDPA, native says why
    monkeypatch.setattr(decode_kernel, "unavailable_reason", lambda: "the CPU lacks avx512_bf16")
    decode_kernel.load.cache_clear()
    try:
        assert decode_kernel.resolve("auto", torch.device("cpu"), torch.bfloat16) is None
        with pytest.raises(ValueError, match="lacks avx512_bf16"):
            decode_kernel.resolve("native", torch.device("cpu"), torch.bfloat16)
    finally:
        decode_kernel.load.cache_clear()


def test_a_failed_build_falls_back_to_sdpa(monkeypatch, tmp_path):
    if decode_kernel.unavailable_reason() is not None:
        pytest.skip(decode_kernel.unavailable_reason())
    monkeypatch.setenv("SEMSHARE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(decode_kernel, "SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    decode_kernel.load.cache_clear()
    try:
        assert decode_kernel.load() is None
        assert not list((tmp_path / "native").glob("*.so"))   # no half-written library left behind
    finally:
        decode_kernel.load.cache_clear()


def test_seqkv_start_matches_rows():
    k = torch.randn(1, 2, 10, 64)
    s = SeqKV([k], [k.clone()], position=10)
    assert s.start(0, None) == 0 and s.start(0, 4) == 6
    kk, _ = s.rows(0, 4)
    assert kk.shape[2] == 4 and torch.equal(kk, k[:, :, 6:])


def test_sdpa_mode_keeps_bf16_decode_identical_to_generate():
    """``decode_attention="sdpa"``: a bf16 decode gives ``model.generate``'s greedy tokens."""
    engine = _bf16_engine("llama", "sdpa")
    assert engine.decode_kernel is None
    for start in (0, 30):
        ids = _ids(engine, start, 6)
        ours = list(engine.decode(engine.prefill(ids), max_new_tokens=16, stop_on_eos=False))
        out = engine.model.generate(torch.from_numpy(ids)[None], max_new_tokens=16, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert ours == out[0, ids.size:].tolist()


@needs_kernel
def test_the_kernel_writes_the_steps_rows_exactly_as_python_appends():
    """The fused append (rows written by the kernel before it attends) leaves the same
    buffers and gives the same output as appending in Python first."""
    g = torch.Generator().manual_seed(5)
    b, hkv, group, d = 3, 2, 3, 64
    lengths = [9, 30, 17]
    seqs = [SeqKV([torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16)],
                  [torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16)], position=n) for n in lengths]
    twins = [SeqKV([s.keys[0][:, :, :n].clone()], [s.values[0][:, :, :n].clone()], position=n)
             for s, n in zip(seqs, lengths)]
    q = torch.randn(1, hkv * group, b, d, generator=g).to(torch.bfloat16)
    new_k = torch.randn(1, hkv, b, d, generator=g).to(torch.bfloat16)                    # contiguous
    new_v = torch.randn(1, b, hkv, d, generator=g).to(torch.bfloat16).transpose(1, 2)   # strided, as HF's values
    for s, k, v in zip(twins, new_k.unbind(2), new_v.unbind(2)):
        s.append(0, k, v)
    for s in seqs:
        s.reserve(0)
    fused = KERNEL.attend(q, [s.keys[0] for s in seqs], [s.values[0] for s in seqs], [0] * b,
                          [s.lengths[0] for s in seqs], 0.125, new_k, new_v)
    plain = KERNEL.attend(q, [s.keys[0] for s in twins], [s.values[0] for s in twins], [0] * b,
                          [s.lengths[0] for s in twins], 0.125)
    assert torch.equal(fused, plain)
    for s, t in zip(seqs, twins):
        n = t.lengths[0]
        assert s.lengths[0] == n
        assert torch.equal(s.keys[0][:, :, :n], t.keys[0][:, :, :n])
        assert torch.equal(s.values[0][:, :, :n], t.values[0][:, :, :n])


@needs_kernel
def test_rows_reserved_for_a_kernel_that_refuses_are_written_in_python(monkeypatch):
    """If the kernel refuses a layer after ``update`` reserved the rows, the step still
    appends them and attends with SDPA: the same tokens as the SDPA engine."""
    native, sdpa = _bf16_engine("llama", "native"), _bf16_engine("llama", "sdpa")
    monkeypatch.setattr(type(native.decode_kernel), "attend", lambda self, *a, **k: None)
    ids = _ids(native, 0, 5)
    a = list(native.decode(native.prefill(ids), max_new_tokens=12, stop_on_eos=False))
    b = list(sdpa.decode(sdpa.prefill(ids), max_new_tokens=12, stop_on_eos=False))
    assert a == b
