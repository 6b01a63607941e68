"""The native one-pass gather + key re-rotation (semshare_core.gather_kernel) against the torch path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core import SemShareConfig, SemShareEngine, gather_kernel, native
from semshare_core.models import tiny_random_model
from semshare_core.rope import _rotate_half_inplace

from .test_multisource import _rag
from .tiny import tokenizer

KERNEL = gather_kernel.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler, or the build failed (see the log)")


def _angles(delta: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = delta[:, None].float() * inv[None]
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def _torch_gather(srcs, row_src, row_pos, cos, sin):
    """The definition: rows by index (unmapped: zero), then the float32 half-split rotation of the keys."""
    L, _, H, _, D = srcs[0].shape
    out = torch.zeros(L, 2, H, row_src.size, D, dtype=srcs[0].dtype)
    for i, (k, p) in enumerate(zip(row_src.tolist(), row_pos.tolist())):
        if k >= 0:
            out[:, :, :, i] = srcs[k][:, :, :, p]
    for l in range(L):
        out[l, 0].copy_(_rotate_half_inplace(out[l, 0].float(), cos, sin))
    return out


def _random_case(seed: int = 0, n: int = 300, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    rs = np.random.RandomState(seed)
    srcs = [(torch.randn(3, 2, 2, m, d, generator=g) * 4).bfloat16() for m in (90, 70, 50)]
    row_src = rs.randint(-1, 3, n).astype(np.int32)
    row_pos = np.array([rs.randint(0, srcs[k].shape[3]) if k >= 0 else 0 for k in row_src], dtype=np.int64)
    cos, sin = _angles(torch.arange(n) - torch.from_numpy(row_pos), d)
    return srcs, row_src, row_pos, cos, sin


@needs_kernel
@pytest.mark.parametrize("d", [16, 64, 128])
def test_kernel_matches_the_torch_path_bit_for_bit(d):
    srcs, row_src, row_pos, cos, sin = _random_case(d=d)
    want = _torch_gather(srcs, row_src, row_pos, cos, sin)
    out = torch.full_like(want, 7.0)
    assert KERNEL.gather_rotate(out, srcs, row_src, row_pos, cos, sin)
    mapped = torch.from_numpy(row_src >= 0)
    # the same bits on every reused row (torch's addcmul fuses its multiply-add; so does the kernel)
    assert torch.equal(out[:, :, :, mapped].view(torch.int16), want[:, :, :, mapped].view(torch.int16))
    assert not out[:, :, :, ~mapped].any()            # unmapped rows: zero (they are recomputed)
    assert torch.equal(out, want)                      # (+0 == -0)


@needs_kernel
def test_kernel_leaves_layers_below_from_layer_alone():
    srcs, row_src, row_pos, cos, sin = _random_case(seed=1)
    want = _torch_gather(srcs, row_src, row_pos, cos, sin)
    out = torch.full_like(want, 3.0)
    assert KERNEL.gather_rotate(out, srcs, row_src, row_pos, cos, sin, from_layer=1)
    assert (out[0] == 3.0).all() and torch.equal(out[1:], want[1:])


@needs_kernel
def test_kernel_refuses_what_it_does_not_take():
    srcs, row_src, row_pos, cos, sin = _random_case(seed=2)
    out = torch.empty(3, 2, 2, row_src.size, 64, dtype=torch.bfloat16)
    # float32 sources or output, a non-contiguous source, another head count: not taken, nothing written
    assert not KERNEL.gather_rotate(out.float(), [s.float() for s in srcs], row_src, row_pos, cos, sin)
    assert not KERNEL.gather_rotate(out, [srcs[0].transpose(3, 4).contiguous().transpose(3, 4)] + srcs[1:],
                                    row_src, row_pos, cos, sin)
    assert not KERNEL.gather_rotate(out, [s[:, :, :1].contiguous() for s in srcs], row_src, row_pos, cos, sin)
    # a position past its source's end is an error, not a read out of bounds
    bad = row_pos.copy()
    bad[int(np.flatnonzero(row_src == 2)[0])] = 50
    with pytest.raises(ValueError, match="out of range"):
        KERNEL.gather_rotate(out, srcs, row_src, bad, cos, sin)


def test_a_failed_build_falls_back_to_torch(monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SEMSHARE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gather_kernel, "SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    gather_kernel.load.cache_clear()
    try:
        assert gather_kernel.load() is None
        assert not list((tmp_path / "native").glob("*.so"))
    finally:
        gather_kernel.load.cache_clear()


@pytest.fixture(scope="module")
def bf16_engine():
    tok = tokenizer()
    model = tiny_random_model("llama", vocab_size=len(tok), hidden_size=128, heads=4, kv_heads=2, dtype=torch.bfloat16)
    return SemShareEngine(model, tok, SemShareConfig(window=1, recompute_min_tokens=0))


@needs_kernel
def test_engine_uses_the_kernel_for_bf16_on_cpu_and_hits_are_unchanged(bf16_engine, monkeypatch):
    engine = bf16_engine
    assert engine.gather_kernel is not None
    ids, refs = _rag(engine)
    m = engine.map_to_sources(ids, refs)
    assert len(set(m.source[m.source >= 0].tolist())) == 3
    native_buf = engine.gather_sources(refs, m)
    native_hit = engine.prefill_multi(ids, refs)
    single = engine.map_to_reference(ids, refs[0])
    native_single = engine.gather_reference(refs[0], single)
    native_one = engine.prefill(ids, refs[0])
    calls = []
    real = engine.gather_kernel.gather_rotate
    monkeypatch.setattr(engine.gather_kernel, "gather_rotate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    engine.gather_sources(refs, m)
    engine.gather_reference(refs[0], single)
    assert len(calls) == 2
    monkeypatch.setattr(engine, "gather_kernel", None)
    assert torch.equal(engine.gather_sources(refs, m), native_buf)
    assert torch.equal(engine.gather_reference(refs[0], single), native_single)
    torch_hit = engine.prefill_multi(ids, refs)
    torch_one = engine.prefill(ids, refs[0])
    for a, b in ((native_hit, torch_hit), (native_one, torch_one)):
        assert a.stats.hit and b.stats.hit
        assert torch.equal(a.logits, b.logits)
        for l in range(engine.num_layers):
            assert torch.equal(a.keys[l], b.keys[l]) and torch.equal(a.values[l], b.values[l])


def test_engine_keeps_the_torch_path_for_float32():
    from .tiny import tiny_engine

    assert tiny_engine("llama").gather_kernel is None
