"""Exactness invariants of the SemShare prefill on tiny random Llama and Mistral (float32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core import KVMismatchError
from semshare_core.matching import NONE

from .tiny import prose, tiny_engine


def _prompt(engine, start=0, count=12):
    return engine.encode(" ".join(prose(start, count)))


def test_no_reference_matches_generate(engine):
    ids = _prompt(engine)
    t = torch.from_numpy(ids)[None]
    out = engine.model.generate(t, max_new_tokens=12, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    pre = engine.prefill(ids, reference=None)
    assert not pre.stats.hit
    assert torch.equal(pre.logits, out.logits[0][0].float())
    toks = list(engine.decode(pre, max_new_tokens=12, temperature=0.0, stop_on_eos=False))
    assert toks == out.sequences[0, ids.size:].tolist()


def test_reference_identical_recompute_zero(engine):
    ids = _prompt(engine)
    full = engine.prefill(ids)
    ref = engine.export_kv(full)
    hit = engine.prefill(ids, ref, engine.config.with_(recompute_ratio=0.0, replay_exact=False))
    assert hit.stats.hit and hit.stats.rows_per_layer[1:] == [1] * (engine.num_layers - 1)
    rel = (hit.logits - full.logits).abs().max() / full.logits.abs().max()
    assert rel < 1e-4


def test_recompute_all_equals_full_prefill_for_any_reference(engine):
    ids = _prompt(engine, 0, 12)
    other = engine.export_kv(engine.prefill(_prompt(engine, 300, 10)))
    full = engine.prefill(ids)
    hit = engine.prefill(ids, other, engine.config.with_(recompute_ratio=1.0))
    assert hit.stats.hit and hit.stats.rows_per_layer == [ids.size] * engine.num_layers
    torch.testing.assert_close(hit.logits, full.logits, rtol=1e-5, atol=1e-5)
    for l in range(engine.num_layers):
        torch.testing.assert_close(hit.keys[l], full.keys[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hit.values[l], full.values[l], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,rope", [("llama", "default"), ("mistral", "default"), ("llama", "llama3")])
def test_rerotated_layer0_kv_equals_full_prefill(arch, rope):
    engine = tiny_engine(arch, rope)
    sents = prose(20, 12)
    ref_ids = engine.encode(" ".join(sents))
    tgt_ids = engine.encode(" ".join(sents[:1] + ["An entirely new sentence is inserted right here, shifting things."] + sents[1:]))
    ref = engine.export_kv(engine.prefill(ref_ids))
    mapping = engine.map_to_reference(tgt_ids, ref)
    exact = torch.from_numpy(mapping.exact)
    shifted = torch.from_numpy(mapping.ref_index != np.arange(tgt_ids.size)) & exact
    assert int(shifted.sum()) > 0.5 * tgt_ids.size  # positions really moved
    gathered = engine.gather_reference(ref, mapping)
    full = engine.prefill(tgt_ids)
    torch.testing.assert_close(gathered[0, 0][:, exact], full.keys[0][0][:, exact], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(gathered[0, 1][:, exact], full.values[0][0][:, exact], rtol=1e-4, atol=2e-5)
    # without re-rotation the shifted keys would be wrong: the check above can fail
    raw = ref.to_torch()[0, 0].index_select(1, torch.from_numpy(mapping.ref_index))
    assert not torch.allclose(raw[:, shifted], full.keys[0][0][:, shifted], atol=1e-3)


def test_retention_one_changes_nothing(engine):
    ids = _prompt(engine, 40, 12)
    ref = engine.export_kv(engine.prefill(_prompt(engine, 40, 11)))
    a = engine.prefill(ids, ref)
    b = engine.prefill(ids, ref, engine.config.with_(retention=1.0, recovery=0.5))
    assert torch.equal(a.logits, b.logits)
    assert b.stats.retained_per_layer == [ids.size] * engine.num_layers
    assert list(engine.decode(a, 8, 0.0, stop_on_eos=False)) == list(engine.decode(b, 8, 0.0, stop_on_eos=False))


def test_compute_is_really_saved(engine):
    """Hooks count the rows each decoder layer processes during a hit: only one pass, |S| rows after layer 0."""
    sents = prose(60, 14)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:5] + ["A short new sentence replaces an old one here."] + sents[6:]))
    calls: list[tuple[int, int]] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: calls.append((i, (a[0] if a else kw["hidden_states"]).shape[1])), with_kwargs=True)
             for i, layer in enumerate(engine.model.model.layers)]
    try:
        pre = engine.prefill(ids, ref, engine.config.with_(recompute_ratio=0.3))
    finally:
        for h in hooks:
            h.remove()
    n = ids.size
    assert [i for i, _ in calls] == list(range(engine.num_layers)), "each layer runs exactly once"
    assert calls[0][1] == n
    selected = int(np.ceil(0.3 * n))
    forced = int(pre.mapping.must_recompute.sum()) + engine.config.window
    for _, rows in calls[1:]:
        assert rows <= selected + forced < n
    assert pre.stats.rows_per_layer == [r for _, r in calls]


def test_reused_kv_really_feeds_generation(engine):
    sents = prose(80, 12)
    ref_ids = engine.encode(" ".join(sents))
    ids = engine.encode(" ".join(sents[:3] + ["Something different is said in this sentence."] + sents[4:]))
    ref = engine.export_kv(engine.prefill(ref_ids))
    cfg = engine.config.with_(recompute_ratio=0.2)
    base = engine.prefill(ids, ref, cfg)
    again = engine.prefill(ids, ref, cfg)
    assert torch.equal(base.logits, again.logits)
    # rows layer 1 did not recompute still hold the gathered reference KV bit for bit
    gathered = engine.gather_reference(ref, base.mapping)
    untouched = torch.eq(base.keys[1][0], gathered[1, 0]).all(dim=(0, 2)).numpy()
    reused = np.nonzero(untouched)[0]
    assert reused.size > ids.size // 2
    mapping = base.mapping
    data = ref.data.copy()
    ref_rows = np.unique(mapping.ref_index[reused])
    data[1:, :, :, ref_rows] += 0.5
    corrupted = type(ref)(data, ref.dtype, ref.token_ids, ref.signature)
    bad = engine.prefill(ids, corrupted, cfg)
    assert not torch.allclose(bad.logits, base.logits, atol=1e-4)


def test_pruned_cache_respects_budget_and_decodes_at_true_positions(engine):
    sents = prose(100, 14)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:7] + ["Yet another new sentence goes in the middle."] + sents[8:]))
    cfg = engine.config.with_(retention=0.4, recovery=1.0, window=4, sink_tokens=2)
    pre = engine.prefill(ids, ref, cfg)
    n, L = ids.size, engine.num_layers
    budgets = [max(int(np.ceil(n * cfg.retention_share(l, L))), cfg.sink_tokens + cfg.window) for l in range(L)]
    assert pre.stats.retained_per_layer[0] == n
    assert all(k <= b for k, b in zip(pre.stats.retained_per_layer, budgets))
    assert pre.stats.retained_per_layer[-1] < n
    for l in range(L):
        assert pre.cache.layers[l].keys.shape[2] == pre.stats.retained_per_layer[l]

    # positions fed to RoPE during decode continue from n, not from the pruned length
    seen = []
    rot = engine.model.model.rotary_emb
    h = rot.register_forward_hook(lambda m, a, kw, out: seen.append(int(kw.get("position_ids", a[1] if len(a) > 1 else None).reshape(-1)[-1])), with_kwargs=True)
    try:
        toks = list(engine.decode(pre, max_new_tokens=5, temperature=0.0, stop_on_eos=False))
    finally:
        h.remove()
    assert seen == [n, n + 1, n + 2, n + 3]

    # decoding with the pruned cache == decoding with the full KV and the dropped tokens masked out
    pre2 = engine.prefill(ids, ref, cfg)
    kept = [set(_kept_rows(pre2, l)) for l in range(L)]
    ref_toks = _masked_decode(engine, pre2, kept, steps=5)
    assert toks == ref_toks


def _kept_rows(pre, layer):
    full_k = pre.keys[layer][0]
    kept_k = pre.cache.layers[layer].keys[0]
    # kept rows are the full-buffer rows equal to the pruned cache rows, in order
    idx, j = [], 0
    for i in range(full_k.shape[1]):
        if j < kept_k.shape[1] and torch.equal(full_k[:, i], kept_k[:, j]):
            idx.append(i)
            j += 1
    assert j == kept_k.shape[1]
    return idx


@torch.no_grad()
def _masked_decode(engine, pre, kept, steps):
    from transformers import DynamicCache

    model = engine.model
    base = model.model
    n = pre.ids.size
    cache = DynamicCache()
    for l, (k, v) in enumerate(zip(pre.keys, pre.values)):
        cache.update(k.clone(), v.clone(), l)
    logits, toks = pre.logits, []
    for t in range(steps):
        tok = int(torch.argmax(logits))
        toks.append(tok)
        if t + 1 == steps:
            break
        pos = torch.tensor([[n + t]])
        hidden = base.embed_tokens(torch.tensor([[tok]]))
        pe = base.rotary_emb(hidden, pos)
        for l, layer in enumerate(base.layers):
            allowed = torch.zeros(1, 1, 1, n + t + 1, dtype=torch.bool)
            allowed[..., sorted(kept[l])] = True
            allowed[..., n:] = True
            hidden = layer(hidden, attention_mask=allowed, position_ids=pos, position_embeddings=pe, cache=cache)
        logits = model.lm_head(base.norm(hidden))[0, -1]
    return toks


def test_kv_from_another_model_is_refused():
    llama, mistral = tiny_engine("llama"), tiny_engine("mistral")
    ids = llama.encode(" ".join(prose(0, 10)))
    ref = mistral.export_kv(mistral.prefill(ids))
    with pytest.raises(KVMismatchError, match="different model"):
        llama.prefill(ids, ref)


def test_unmatched_tokens_are_always_recomputed(engine):
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(prose(120, 10)))))
    ids = engine.encode(" ".join(prose(120, 10)) + " zqxj vvkw " * 3)
    pre = engine.prefill(ids, ref, engine.config.with_(recompute_ratio=0.0, fuzzy_min_cos=1.0))
    none = np.nonzero(pre.mapping.kind == NONE)[0]
    assert none.size > 0
    assert all(r >= none.size for r in pre.stats.rows_per_layer)


@pytest.mark.parametrize("arch,rope", [("llama", "default"), ("llama", "llama3"), ("mistral", "default")])
def test_fused_rerotation_equals_model_apply_rotary(arch, rope):
    from semshare_core.rope import Rerotator

    rr = Rerotator(tiny_engine(arch, rope).model)
    assert rr.fast
    keys = torch.randn(3, 2, 50, 16)
    delta = torch.randint(-300, 300, (50,))
    fast = rr(keys, delta)
    rr.fast = False
    torch.testing.assert_close(fast, rr(keys, delta), rtol=1e-5, atol=1e-5)


def test_selection_skips_an_unchanged_prefix(engine):
    """Tokens before the edit have the reference's context: their K/V deviate by ~0 and are not recomputed.

    The edit keeps every position (same-length token replacement), so only context,
    not re-rotation noise, can tell edited-context tokens from the prefix.
    """
    ref_ids = engine.encode(" ".join(prose(140, 14)))
    ref = engine.export_kv(engine.prefill(ref_ids))
    ids = ref_ids.copy()
    a = ids.size // 2
    ids[a:a + 12] = engine.encode(" ".join(prose(400, 3)))[:12]
    seen = {}
    layer1 = engine.model.model.layers[1]
    h = layer1.register_forward_pre_hook(lambda m, a, kw: seen.update(rows=kw["position_ids"].reshape(-1).clone()), with_kwargs=True)
    try:
        pre = engine.prefill(ids, ref, engine.config.with_(recompute_ratio=0.2))
    finally:
        h.remove()
    rows = seen["rows"]
    assert rows.numel() == pre.stats.rows_per_layer[1] < ids.size
    assert int(rows.min()) >= a - 1


def test_identical_prompt_is_reused_almost_entirely(engine):
    """An unchanged context deviates by ~0: only the last window is recomputed, like exact prefix caching."""
    ids = _prompt(engine, 200, 12)
    full = engine.prefill(ids)
    ref = engine.export_kv(full)
    cfg = engine.config.with_(replay_exact=False)
    hit = engine.prefill(ids, ref, cfg)                  # default schedule
    assert hit.stats.rows_per_layer[1:] == [engine.config.window] * (engine.num_layers - 1)
    assert hit.stats.reused_tokens == ids.size - engine.config.window
    rel = (hit.logits - full.logits).abs().max() / full.logits.abs().max()
    assert rel < 1e-4
    off = engine.prefill(ids, ref, cfg.with_(deviation_tol=0.0))
    # forced rows (here only the last window: nothing is unmatched) come on top of the share
    assert off.stats.rows_per_layer[1] == cfg.recompute_rows(1, int(ids.size)) + cfg.window > engine.config.window
    inside = engine.prefill(ids, ref, cfg.with_(deviation_tol=0.0, forced_in_budget=True))
    assert inside.stats.rows_per_layer[1] == cfg.recompute_rows(1, int(ids.size))


def test_reference_kv_on_device_gives_the_same_prefill(engine):
    sents = prose(220, 12)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:4] + ["A sentence that was never there before."] + sents[5:]))
    host = engine.prefill(ids, ref)
    dev = engine.prefill(ids, ref, reference_kv=ref.to_torch(engine.device))
    assert torch.equal(host.logits, dev.logits) and host.stats.rows_per_layer == dev.stats.rows_per_layer
    with pytest.raises(ValueError, match="shape"):
        engine.prefill(ids, ref, reference_kv=ref.to_torch()[:, :, :, :3])


def test_identical_prompt_with_exact_reference_is_replayed_like_generate(engine):
    ids = _prompt(engine, 240, 10)
    t = torch.from_numpy(ids)[None]
    out = engine.model.generate(t, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    full = engine.prefill(ids)
    ref = engine.export_kv(full)
    assert ref.last_logits is not None
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in engine.model.model.layers]
    try:
        rep = engine.prefill(ids, ref)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [] and rep.stats.hit and rep.stats.reused_tokens == ids.size
    assert torch.equal(rep.logits, full.logits)
    assert list(engine.decode(rep, 10, 0.0, stop_on_eos=False)) == out[0, ids.size:].tolist()
    # the reference is untouched by the decode, and a replay exports an exact entry again
    assert np.array_equal(engine.export_kv(engine.prefill(ids, ref)).data, ref.data)
    # a selective hit is not exact: its export says so (it still carries its first-token
    # logits, so that an identical repeat replays the hit's answer)
    other = engine.export_kv(engine.prefill(_prompt(engine, 240, 11)))
    hit = engine.prefill(ids, other)
    assert hit.stats.rows_per_layer[0] == ids.size and not engine.export_kv(hit).exact


def test_decode_holds_only_retained_rows(engine):
    """Pruning saves memory for real: once decoding starts, only the retained rows stay alive."""
    import gc
    import weakref

    sents = prose(100, 14)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:7] + ["Yet another new sentence goes in the middle."] + sents[8:]))
    pre = engine.prefill(ids, ref, engine.config.with_(retention=0.4, window=4, sink_tokens=2))
    packed = engine.export_kv(pre)
    assert packed.seq_len == ids.size  # the export keeps every row
    full_rows = [weakref.ref(t) for t in pre.keys + pre.values]  # views of the prompt's [L, 2, H, n, D] buffer
    H, D, L = engine.signature.num_kv_heads, engine.signature.head_dim, engine.num_layers
    row_bytes = 2 * H * D * torch.finfo(engine.dtype).bits // 8  # K + V of one token at one layer

    def cache_bytes() -> int:
        return sum(t.numel() * t.element_size() for layer in pre.cache.layers for t in (layer.keys, layer.values))

    retained = pre.stats.retained_per_layer
    assert sum(retained) < L * ids.size
    assert cache_bytes() == sum(retained) * row_bytes
    steps = 3
    list(engine.decode(pre, max_new_tokens=steps + 1, temperature=0.0, stop_on_eos=False))
    gc.collect()
    assert pre.keys == [] and pre.values == []
    assert all(r() is None for r in full_rows), "the unpruned buffers outlived the start of decoding"
    state = pre.cache  # the decode cache (a SeqKV): retained rows + one per step, plus bounded growth room
    assert sum(state.lengths) == sum(retained) + steps * L
    from semshare_core.batch import GROW_ROWS

    assert state.nbytes <= (sum(retained) + L * (steps + GROW_ROWS)) * row_bytes
    with pytest.raises(RuntimeError, match="released"):
        engine.export_kv(pre)


def test_row_plan_chunks_equal_one_masked_call():
    """Position-ordered chunks over fewer keys give exactly the one-call masked attention."""
    import torch.nn.functional as F

    from semshare_core.attention import RowPlan, _planned_attention, visibility_mask

    g = torch.Generator().manual_seed(0)
    n = 300
    rows = torch.sort(torch.randperm(n - 4, generator=g)[:120]).values
    rows = torch.cat([rows, torch.arange(n - 4, n)])
    q = torch.randn(1, 4, rows.numel(), 16, generator=g)
    k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    for sliding in (None, 50):
        one = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=visibility_mask(rows, n, sliding)).transpose(1, 2)
        plan = RowPlan.build(rows, n, chunks=4, sliding_window=sliding)
        assert len(plan.spans) == 4 and plan.spans[0][2] < n  # really chunked, first chunk sees fewer keys
        torch.testing.assert_close(_planned_attention(None, q, k, v, plan, None), one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_plan_additive_masks_equal_bool_masks(dtype):
    """Masks kept additive in the queries' dtype give exactly what sdpa computes from bool masks."""
    from semshare_core.attention import RowPlan, _planned_attention

    g = torch.Generator().manual_seed(1)
    n = 300
    rows = torch.cat([torch.sort(torch.randperm(n - 4, generator=g)[:100]).values, torch.arange(n - 4, n)])
    q = torch.randn(1, 4, rows.numel(), 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, n, 16, generator=g).to(dtype) for _ in range(2))
    for sliding in (None, 50):
        plain = RowPlan.build(rows, n, chunks=4, sliding_window=sliding)
        additive = RowPlan.build(rows, n, chunks=4, sliding_window=sliding, mask_dtype=dtype)
        assert all(m.dtype == dtype for m in additive.masks)
        assert torch.equal(_planned_attention(None, q, k, v, additive, None),
                           _planned_attention(None, q, k, v, plain, None))
        assert torch.equal(additive.last_rows_mask(8), plain.last_rows_mask(8))


@pytest.mark.parametrize("chunks", [2, 5])
def test_chunked_selected_rows_give_the_same_prefill(engine, chunks, monkeypatch):
    from semshare_core import attention

    monkeypatch.setattr(attention, "MIN_CHUNK_ROWS", 1)  # tiny prompts: chunk even a few rows
    sents = prose(60, 20)
    ref = engine.export_kv(engine.prefill(engine.encode(" ".join(sents))))
    ids = engine.encode(" ".join(sents[:5] + ["A short new sentence replaces an old one here."] + sents[6:]))
    cfg = engine.config.with_(retention=0.5)
    one = engine.prefill(ids, ref, cfg.with_(attention_chunks=1))
    many = engine.prefill(ids, ref, cfg.with_(attention_chunks=chunks))
    torch.testing.assert_close(many.logits, one.logits, rtol=1e-5, atol=1e-5)
    for k1, k2 in zip(one.keys, many.keys):
        torch.testing.assert_close(k2, k1, rtol=1e-5, atol=1e-5)
    assert many.stats.rows_per_layer == one.stats.rows_per_layer
    assert many.stats.retained_per_layer == one.stats.retained_per_layer


def test_a_hit_that_would_recompute_everything_is_a_full_prefill(engine):
    """Forced rows on top of the share (or a floor as long as the prompt) would cost more
    than a full prefill: the engine runs the exact full prefill instead (not a hit)."""
    ref = engine.export_kv(engine.prefill(_prompt(engine, 0, 12)))
    ids = _prompt(engine, 5, 12)  # overlaps the reference, partly matched
    n = int(ids.size)
    full = engine.prefill(ids)
    floor = engine.prefill(ids, ref, engine.config.with_(recompute_min_tokens=n))
    assert not floor.stats.hit and floor.exact and floor.stats.rows_per_layer == [n] * engine.num_layers
    assert torch.equal(floor.logits, full.logits)
    hit = engine.prefill(ids, ref, engine.config.with_(recompute_ratio=0.1))
    assert hit.stats.hit and sum(hit.stats.rows_per_layer) + hit.stats.probe_rows < n * engine.num_layers
    assert engine.planned_rows(n, 0, engine.config.with_(recompute_min_tokens=n)) > n * engine.num_layers
    # recompute_ratio 1.0 stays the selective path (it is how exactness is checked)
    assert engine.prefill(ids, ref, engine.config.with_(recompute_ratio=1.0)).stats.hit


def test_read_only_ids_as_from_the_object_store_are_copied_before_torch_sees_them(engine):
    """Ids that came through Ray are read-only views; the engine works on a writable copy
    (torch warns about read-only arrays, once per process, so the test checks the copy)."""
    from semshare_core.engine import _own_ids

    ids = _prompt(engine)
    ro = ids.copy()
    ro.flags.writeable = False
    own = _own_ids(ro)
    assert own.flags.writeable and np.array_equal(own, ids) and own is not ro
    assert np.shares_memory(_own_ids(ids), ids)                   # writable int64 ids: no copy
    assert torch.equal(engine.prefill(ro).logits, engine.prefill(ids).logits)
