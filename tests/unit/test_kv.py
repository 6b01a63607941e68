"""Packed KV: layout, signature checks, wire format robustness."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semshare_core import KVFormatError, KVMismatchError, ModelSignature, PackedKV
from semshare_core.models import tiny_random_model

from .tiny import prose, tiny_engine


def _packed(seq=7, dtype=torch.float32):
    sig = ModelSignature("X", 2, 2, 4, 8, 10, "{}", "abc")
    layers = [(torch.randn(1, 2, seq, 4, dtype=dtype), torch.randn(1, 2, seq, 4, dtype=dtype)) for _ in range(2)]
    return PackedKV.from_layers(layers, np.arange(seq), sig), layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layout_and_roundtrip(dtype):
    p, layers = _packed(dtype=dtype)
    assert p.data.shape == (2, 2, 2, 7, 4) and p.data.flags.c_contiguous
    t = p.to_torch()
    assert t.dtype == dtype
    assert torch.equal(t[1, 0], layers[1][0][0]) and torch.equal(t[0, 1], layers[0][1][0])
    q = PackedKV.from_bytes(p.to_bytes())
    assert q.signature == p.signature and q.dtype == p.dtype
    assert np.array_equal(q.data, p.data) and np.array_equal(q.token_ids, p.token_ids)
    assert p.nbytes == p.data.nbytes + p.token_ids.nbytes


def test_last_logits_roundtrip_and_validation():
    p, layers = _packed()
    q = PackedKV.from_layers(layers, np.arange(7), p.signature, torch.arange(10, dtype=torch.float32))
    r = PackedKV.from_bytes(q.to_bytes())
    assert np.array_equal(r.last_logits, np.arange(10, dtype=np.float32)) and r.nbytes == p.nbytes + 40
    assert PackedKV.from_bytes(p.to_bytes()).last_logits is None
    with pytest.raises(KVFormatError, match="last_logits"):
        PackedKV(p.data, p.dtype, p.token_ids, p.signature, np.zeros(3, dtype=np.float32))


def test_corrupted_and_truncated_blobs_are_rejected():
    blob = _packed()[0].to_bytes()
    with pytest.raises(KVFormatError):
        PackedKV.from_bytes(blob[:-10])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    with pytest.raises(KVFormatError, match="checksum"):
        PackedKV.from_bytes(bytes(flipped))
    with pytest.raises(KVFormatError):
        PackedKV.from_bytes(b"garbage")


def test_shape_mismatch_is_rejected():
    p, _ = _packed()
    with pytest.raises(KVFormatError, match="shape"):
        PackedKV(p.data[:, :, :, :3], p.dtype, p.token_ids, p.signature)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(blob):
    try:
        PackedKV.from_bytes(blob)
    except KVFormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 255))
def test_any_single_byte_flip_is_detected(pos, val):
    blob = bytearray(_packed(seq=3)[0].to_bytes())
    pos %= len(blob)
    if blob[pos] == val:
        return
    blob[pos] = val
    with pytest.raises(KVFormatError):
        PackedKV.from_bytes(bytes(blob))


def test_signature_tells_models_apart():
    a = tiny_random_model("llama", seed=0)
    b = tiny_random_model("llama", seed=1)
    sa, sb = ModelSignature.of(a), ModelSignature.of(b)
    assert sa == ModelSignature.of(tiny_random_model("llama", seed=0))
    assert sa.weights != sb.weights
    with pytest.raises(KVMismatchError, match="weights"):
        sa.check(sb)


@pytest.mark.parametrize("part", ["mlp.down_proj.weight", "post_attention_layernorm.weight"])
def test_signature_refuses_a_fine_tune_of_the_last_layer_only(part):
    """Two models that differ only in their last decoder layer: KV of one is never used by the other."""
    from semshare_core import SemShareEngine

    base = tiny_engine("llama")
    tuned = copy.deepcopy(base.model)
    last = len(tuned.model.layers) - 1
    with torch.no_grad():
        p = dict(tuned.named_parameters())[f"model.layers.{last}.{part}"]
        p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    other = SemShareEngine(tuned, base.tokenizer, base.config)
    assert other.signature.weights != base.signature.weights
    ids = base.encode(" ".join(prose(0, 4)))
    exact = base.export_kv(base.prefill(ids))          # a full prefill's KV, replayable by the base model
    assert exact.last_logits is not None
    with pytest.raises(KVMismatchError, match="weights"):
        other.prefill(ids, exact)                       # neither replayed nor reused
    with pytest.raises(KVMismatchError, match="weights"):
        other.prefill(base.encode(" ".join(prose(1, 4))), exact)


def test_export_matches_prefill_cache():
    eng = tiny_engine("llama")
    ids = eng.encode(" ".join(prose(0, 4)))
    pre = eng.prefill(ids)
    p = eng.export_kv(pre)
    L, H = eng.num_layers, eng.model.config.num_key_value_heads
    assert p.data.shape == (L, 2, H, ids.size, eng.signature.head_dim)
    assert torch.equal(p.to_torch()[2, 0], pre.cache.layers[2].keys[0])


def test_host_staging_gathers_like_index_select_and_reuses_its_buffer():
    """The staging path a GPU hit takes, run on the CPU: same rows, one buffer reused, results owned."""
    from semshare_core.staging import HostStaging

    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 2, 2, 50, 4, generator=g).to(torch.bfloat16)
    stage = HostStaging(torch.device("cpu"), pin=False)
    a_idx = torch.tensor([5, 1, 49, 1])
    a = stage.gather(src, 3, a_idx)
    assert torch.equal(a, src.index_select(3, a_idx))
    ptr = stage.buffer.data_ptr()
    b_idx = torch.tensor([0, 2])
    b = stage.gather(src, 3, b_idx)  # smaller: same buffer
    assert stage.buffer.data_ptr() == ptr and torch.equal(b, src.index_select(3, b_idx))
    assert torch.equal(a, src.index_select(3, a_idx))  # an earlier result is not overwritten
    c_idx = torch.arange(50).flip(0)
    c = stage.gather(src, 3, c_idx)  # larger: the buffer grows
    assert stage.buffer.numel() >= c.numel() and torch.equal(c, src.index_select(3, c_idx))
