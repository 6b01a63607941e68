"""Model families through one adapter (:mod:`semshare_core.families`).

Llama, Mistral (also with a sliding window), Qwen2 (biased QKV) and Qwen3 (q/k norm)
keep the exactness invariants; anything else is refused at load with the reason.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core import SemShareConfig, SemShareEngine
from semshare_core.families import UnsupportedModelError, family_of
from semshare_core.models import load_local, tiny_random_model
from semshare_core.prefill import _probe_next_layer, _probe_supported

from .tiny import prose, tiny_engine, tokenizer

FAMILIES = [("llama", None), ("mistral", None), ("qwen2", None), ("qwen3", None), ("mistral", 16), ("qwen3", 16)]
IDS = [f"{a}-sw{w}" if w else a for a, w in FAMILIES]


def _prompt(engine, start=0, count=12):
    return engine.encode(" ".join(prose(start, count)))


@pytest.mark.parametrize("arch,window", FAMILIES, ids=IDS)
def test_reuse_off_equals_generate(arch, window):
    engine = tiny_engine(arch, sliding_window=window)
    ids = _prompt(engine, 0, 8)
    if window:
        assert ids.size > 3 * window  # the window really cuts
    out = engine.model.generate(torch.from_numpy(ids)[None], max_new_tokens=10, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    pre = engine.prefill(ids)
    torch.testing.assert_close(pre.logits, out.logits[0][0].float(), rtol=1e-5, atol=1e-5)
    assert list(engine.decode(pre, 10, 0.0, stop_on_eos=False)) == out.sequences[0, ids.size:].tolist()


@pytest.mark.parametrize("arch,window", FAMILIES, ids=IDS)
def test_recompute_all_equals_full_prefill(arch, window):
    engine = tiny_engine(arch, sliding_window=window)
    ids = _prompt(engine, 0, 10)
    other = engine.export_kv(engine.prefill(_prompt(engine, 300, 8)))
    full = engine.prefill(ids)
    hit = engine.prefill(ids, other, engine.config.with_(recompute_ratio=1.0))
    assert hit.stats.hit and hit.stats.rows_per_layer == [ids.size] * engine.num_layers
    torch.testing.assert_close(hit.logits, full.logits, rtol=1e-5, atol=1e-5)
    for l in range(engine.num_layers):
        torch.testing.assert_close(hit.keys[l], full.keys[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hit.values[l], full.values[l], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,window", FAMILIES, ids=IDS)
def test_rerotation_exact_at_layer0(arch, window):
    engine = tiny_engine(arch, sliding_window=window)
    sents = prose(20, 10)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    tgt = engine.encode(" ".join(sents[:1] + ["An entirely new sentence is inserted right here, shifting things."]
                                 + sents[1:]))
    mapping = engine.map_to_reference(tgt, ref)
    exact = torch.from_numpy(mapping.exact)
    shifted = torch.from_numpy(mapping.ref_index != np.arange(tgt.size)) & exact
    assert int(shifted.sum()) > 0.5 * tgt.size
    gathered = engine.gather_reference(ref, mapping)
    full = engine.prefill(tgt)
    # float32 angles at positions ~500: ~1e-5 of a unit-norm key (Qwen3's k_norm makes keys ~1)
    tol = 2e-5 * max(1.0, float(full.keys[0].abs().max()))
    torch.testing.assert_close(gathered[0, 0][:, exact], full.keys[0][0][:, exact], rtol=1e-4, atol=tol)
    torch.testing.assert_close(gathered[0, 1][:, exact], full.values[0][0][:, exact], rtol=1e-4, atol=tol)
    raw = ref.to_torch()[0, 0].index_select(1, torch.from_numpy(mapping.ref_index))
    assert not torch.allclose(raw[:, shifted], full.keys[0][0][:, shifted], atol=1e-3)


def test_sliding_window_prompt_exports_every_row_and_a_hit_honours_the_window():
    engine = tiny_engine("mistral", sliding_window=16)
    assert engine.family.sliding_window == 16
    ids = _prompt(engine, 40, 12)[:96]
    assert ids.size == 96
    pre = engine.prefill(ids)
    packed = engine.export_kv(pre)  # was: KVFormatError, KV array shape (4, 2, 2, 15, 16)
    assert packed.data.shape == (4, 2, 2, 96, 16) and packed.seq_len == 96
    from semshare_core import SemanticIndex

    index = SemanticIndex(dim=engine.config.fingerprint_dim)
    index.add("p", engine.fingerprint(ids), ids, packed.data.nbytes, packed, tenant="t")
    assert index.lookup(engine.fingerprint(ids), "t").entry.payload.seq_len == 96
    # a hit at ratio 1.0 reproduces the windowed full prefill; without the window it would not
    tgt = _prompt(engine, 40, 12)[:90]
    hit = engine.prefill(tgt, packed, engine.config.with_(recompute_ratio=1.0))
    full = engine.prefill(tgt)
    torch.testing.assert_close(hit.logits, full.logits, rtol=1e-5, atol=1e-5)
    unwindowed = tiny_engine("mistral")  # same seed and shapes, no window
    assert not torch.allclose(unwindowed.prefill(tgt).logits, full.logits, atol=1e-4)
    # a partial hit runs: selected rows see only their window
    part = engine.prefill(tgt, packed, engine.config.with_(recompute_ratio=0.3, replay_exact=False))
    assert part.stats.hit and part.stats.probe_rows == tgt.size


def test_sliding_window_replay_keeps_every_row_and_decodes_like_generate():
    engine = tiny_engine("mistral", sliding_window=16)
    ids = _prompt(engine, 40, 12)[:96]
    ref = engine.export_kv(engine.prefill(ids))
    rep = engine.prefill(ids, ref)  # identical prompt, exact reference: replayed
    assert rep.stats.hit and rep.stats.recomputed_tokens == 0
    assert engine.export_kv(rep).seq_len == 96  # re-exportable: all rows, not the window's
    full = engine.prefill(ids)
    assert list(engine.decode(rep, 12, 0.0, stop_on_eos=False)) == list(engine.decode(full, 12, 0.0, stop_on_eos=False))


def test_qwen3_probe_applies_q_and_k_norm():
    engine = tiny_engine("qwen3")
    model = engine.model
    layers = model.model.layers
    assert engine.family.qk_norm and _probe_supported(layers[1])
    ids = torch.from_numpy(_prompt(engine, 0, 6))[None]
    n = ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        full = engine.prefill(ids[0].numpy())
        cos, sin = model.model.rotary_emb(out.hidden_states[1], torch.arange(n)[None])
        # layer 1's own input and its own K/V: the probe must find no deviation at all
        probe = _probe_next_layer(model, layers[1], out.hidden_states[1], (full.keys[1], full.values[1]),
                                  cos, sin, window=4, want_attention=True)
    assert probe is not None and float(probe.deviation.max()) < 1e-5
    assert probe.attention is not None and torch.isfinite(probe.attention).all()


def test_qwen3_hit_ranks_by_layer1_deviation():
    engine = tiny_engine("qwen3")
    sents = prose(60, 12)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:5] + ["A short new sentence replaces an old one here."] + sents[6:]))
    pre = engine.prefill(ids, ref, engine.config.with_(recompute_ratio=0.3))
    assert pre.stats.hit and pre.stats.probe_rows == ids.size
    assert pre.stats.rows_per_layer[1] < ids.size


def _save_tiny(tmp_path, cfg_cls, model_cls, **kw):
    cfg = cfg_cls(vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **kw)
    model = model_cls(cfg)
    model.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    return model


def test_gemma2_is_refused_at_load_and_by_the_engine(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = _save_tiny(tmp_path, Gemma2Config, Gemma2ForCausalLM, sliding_window=16)
    with pytest.raises(UnsupportedModelError) as err:
        load_local(tmp_path, dtype="float32")
    msg = str(err.value)
    assert "gemma2" in msg and "softcapping" in msg and "sliding_attention" in msg and "full_attention" in msg
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        SemShareEngine(model, tokenizer(), SemShareConfig())


def test_supported_family_loads_from_a_folder(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _save_tiny(tmp_path, Qwen3Config, Qwen3ForCausalLM)
    lm = load_local(tmp_path, dtype="float32")
    assert family_of(lm.model).name == "qwen3"


def test_fused_qkv_and_length_dependent_rope_are_refused():
    from transformers import Phi3Config, Phi3ForCausalLM

    phi = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(UnsupportedModelError, match="fused QKV"):
        family_of(phi)
    dyn = tiny_random_model("llama", layers=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        SemShareEngine(dyn, tokenizer(), SemShareConfig())


def test_decode_after_a_sliding_window_hit_equals_full_decode():
    engine = tiny_engine("mistral", sliding_window=16)
    ids = _prompt(engine, 40, 12)[:96]
    other = engine.export_kv(engine.prefill(_prompt(engine, 300, 8)))
    full = engine.prefill(ids)
    hit = engine.prefill(ids, other, engine.config.with_(recompute_ratio=1.0))
    assert list(engine.decode(hit, 12, 0.0, stop_on_eos=False)) == list(engine.decode(full, 12, 0.0, stop_on_eos=False))
