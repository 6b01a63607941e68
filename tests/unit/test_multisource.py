"""Reuse from several cached prompts (RAG-shaped prompts): mapping, gather, engine, index."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semshare_core import SemanticIndex, SemShareConfig, prompt_vector
from semshare_core.matching import EXACT_SPAN, EXACT_TOKEN, FUZZY, NONE
from semshare_core.sources import align_sources, map_sources

from .tiny import prose, tiny_engine

NEAR = 6


def _prev_mapped(src: np.ndarray, i: int) -> int:
    j = i - 1
    while j >= 0 and src[j] < 0:
        j -= 1
    return j


def _check_local(m_src, m_pos, kind, kinds, near):
    """Every token of ``kinds`` sits in its nearest mapped neighbour's source, within ``near``
    of the position that neighbour implies."""
    mapped = np.nonzero(m_src >= 0)[0]
    for i in np.nonzero(np.isin(kind, kinds))[0]:
        p = _prev_mapped(m_src, i)
        if p < 0:  # no previous mapped token: the next one anchors it
            p = int(mapped[mapped > i][0])
        assert m_src[i] == m_src[p], (i, p)
        assert abs(int(m_pos[i]) - (int(m_pos[p]) + (i - p))) <= near


sources_st = st.lists(st.lists(st.integers(0, 30), min_size=3, max_size=40), min_size=2, max_size=4)


@settings(max_examples=200, deadline=None)
@given(sources_st, st.lists(st.tuples(st.integers(0, 3), st.integers(0, 39), st.integers(1, 15)), min_size=1,
                            max_size=6), st.lists(st.integers(0, 40), max_size=10), st.randoms(use_true_random=False))
def test_lone_ids_stay_in_their_source_and_near(srcs, pieces, noise, rnd):
    refs = [np.array(s, dtype=np.int64) for s in srcs]
    tgt = []
    for s, a, ln in pieces:
        r = refs[s % len(refs)]
        tgt += r[a % r.size:a % r.size + ln].tolist()
        if noise:
            tgt.append(noise[rnd.randrange(len(noise))])
    t = np.array(tgt, dtype=np.int64)
    src, pos, kind = align_sources(t, refs, anchor=3, near=NEAR)
    ok = src >= 0
    assert ((kind == NONE) == ~ok).all()
    for i in np.nonzero(ok)[0]:
        assert refs[src[i]][pos[i]] == t[i]
    # lone ids stay in the source of the run they continue, near where it would continue
    for i in np.nonzero(kind == EXACT_TOKEN)[0]:
        p = _prev_mapped(src, i)
        if p >= 0 and kind[p] == EXACT_SPAN and p == i - 1 and src[p] == src[i] and pos[p] + 1 == pos[i]:
            continue  # a one-token tail of a span (k-gram match), not a lone-id pick
        if p < 0:
            continue
        assert src[i] == src[p] and abs(int(pos[i]) - (int(pos[p]) + (i - p))) <= NEAR


def test_lone_id_in_another_passage_is_not_taken():
    a, b = np.arange(0, 40), np.arange(100, 140)
    b = b.copy()
    b[30] = 7  # id 7 appears in source 1, far from where source-0 runs continue
    t = np.concatenate([a[:5], [7 + 1000], b[:10], [7], [555], b[12:20]])
    src, pos, kind = align_sources(t, [a, b], near=4)
    i = 16  # the lone 7 after a run of source 1 (b[:10]) : source 0 has it, source 1 only at 30 (too far)
    assert t[i] == 7 and kind[i] == NONE
    src, pos, kind = align_sources(t, [a, b], near=64)
    assert kind[i] == EXACT_TOKEN and src[i] == 1 and pos[i] == 30  # same source only, never source 0


def test_exact_runs_from_any_source_longest_wins():
    a = np.arange(0, 50)
    b = np.concatenate([np.arange(10, 20), np.arange(300, 340)])  # b shares a[10:20] only
    t = np.concatenate([np.arange(10, 30), np.arange(300, 320)])
    src, pos, kind = align_sources(t, [b, a])
    assert (kind == EXACT_SPAN).all()
    assert (src[:20] == 1).all() and (pos[:20] == np.arange(10, 30)).all()  # the 20-run of a beats b's 10-run
    assert (src[20:] == 0).all() and (pos[20:] == np.arange(10, 30)).all()


def test_boundaries_are_jumps_to_another_source_or_place():
    a, b = np.arange(0, 40), np.arange(100, 140)
    t = np.concatenate([a[0:10], b[0:10], b[20:30], [999], b[31:35], a[10:15]])
    m = map_sources(t, [a, b])
    # b[20:30] follows b[0:10] in the prompt but not in b: a boundary; so is b[31:35] after
    # the NONE gap (an edit: b's run resumes, but its K/V saw b[30] where the prompt has 999)
    assert m.boundaries().tolist() == [10, 20, 31, 35]


def test_fuzzy_stays_in_the_neighbour_source(engine):
    g = np.random.default_rng(0)
    refs = [g.integers(0, 200, 60), g.integers(200, 400, 60), g.integers(0, 400, 60)]
    t = np.concatenate([refs[0][:20], g.integers(400, 500, 5), refs[1][10:40], g.integers(400, 500, 5),
                        refs[2][:20]])
    m = engine.map_to_sources(t, [_fake_packed(engine, r) for r in refs],
                              engine.config.with_(fuzzy_min_cos=-1.0, source_near=NEAR))  # default is 0
    assert m.counts["fuzzy"] > 0
    _check_local(m.source, m.src_index, m.kind, [EXACT_TOKEN, FUZZY], NEAR)
    m0 = engine.map_to_sources(t, [_fake_packed(engine, r) for r in refs], engine.config.with_(source_near=0))
    assert m0.counts["fuzzy"] == 0 and m0.counts["exact_token"] == 0


def _fake_packed(engine, ids):
    """A PackedKV with the engine's signature (zeros), only its token ids matter."""
    from semshare_core import PackedKV

    s = engine.signature
    data = np.zeros((s.num_layers, 2, s.num_kv_heads, len(ids), s.head_dim), dtype=np.float32)
    return PackedKV(data, "float32", np.asarray(ids, dtype=np.int64), s)


# engine -------------------------------------------------------------------------------
def _rag(engine):
    """Three cached prompts (3 passages each) and a prompt made of one passage of each."""
    p = [" ".join(prose(10 * i, 3)) for i in range(9)]
    cached = [p[0:3], p[3:6], p[6:9]]
    instr = "Answer using the passages."
    refs = [engine.export_kv(engine.prefill(engine.encode(instr + "\n\n" + "\n\n".join(c) + "\n\nWhat now?")))
            for c in cached]
    ids = engine.encode(instr + "\n\n" + "\n\n".join([p[1], p[5], p[6]]) + "\n\nWhich one is it?")
    return ids, refs


def test_recompute_all_with_several_sources_equals_full_prefill(engine):
    ids, refs = _rag(engine)
    full = engine.prefill(ids)
    hit = engine.prefill_multi(ids, refs, engine.config.with_(recompute_ratio=1.0))
    assert hit.stats.hit and len([s for s in hit.stats.sources if s["used"]]) == 3
    torch.testing.assert_close(hit.logits, full.logits, rtol=1e-5, atol=1e-5)
    for l in range(engine.num_layers):
        torch.testing.assert_close(hit.keys[l], full.keys[l], rtol=1e-5, atol=1e-5)


def test_per_row_rerotation_is_exact_at_layer0(engine):
    ids, refs = _rag(engine)
    m = engine.map_to_sources(ids, refs)
    assert len(set(m.source[m.source >= 0].tolist())) == 3
    exact = torch.from_numpy(m.exact)
    moved = torch.from_numpy(m.src_index != np.arange(ids.size)) & exact
    assert int(moved.sum()) > 0.5 * ids.size
    gathered = engine.gather_sources(refs, m)
    full = engine.prefill(ids)
    torch.testing.assert_close(gathered[0, 0][:, exact], full.keys[0][0][:, exact], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(gathered[0, 1][:, exact], full.values[0][0][:, exact], rtol=1e-4, atol=2e-5)
    # the device-tensor path gives the same buffer
    again = engine.gather_sources(refs, m, [r.to_torch() for r in refs])
    assert torch.equal(again, gathered)


def test_runs_are_contiguous_in_prompt_and_source():
    a, b = np.arange(0, 40), np.arange(100, 140)
    t = np.concatenate([a[0:10], b[0:10], b[20:30], [999], b[31:35], a[10:15]])
    m = map_sources(t, [a, b])
    starts, stops, owner, src_starts = m.runs()
    # the NONE gap splits b's run (boundaries() does not): runs never span an unmapped row
    assert list(zip(starts, stops, owner, src_starts)) == [(0, 10, 0, 0), (10, 20, 1, 0), (20, 30, 1, 20),
                                                          (31, 35, 1, 31), (35, 40, 0, 10)]
    covered = np.zeros(t.size, dtype=bool)
    for s_, e_, k, p in zip(starts, stops, owner, src_starts):
        assert (m.source[s_:e_] == k).all() and (m.src_index[s_:e_] == np.arange(p, p + e_ - s_)).all()
        covered[s_:e_] = True
    assert (covered == (m.source >= 0)).all()


def _gather_by_rows(engine, refs, m):
    """The plain definition: every row from its source by index, unmapped rows zero, keys re-rotated."""
    kv = [r.to_torch() for r in refs]
    first = kv[0].shape
    out = torch.zeros((first[0], 2, first[2], m.source.size, first[4]), dtype=engine.dtype)
    for i in range(m.source.size):
        if m.source[i] >= 0:
            out[:, :, :, i] = kv[m.source[i]][:, :, :, m.src_index[i]]
    engine.rerotate.rotate_(out[:, 0], torch.arange(m.source.size) - torch.from_numpy(m.src_index))
    return out


def test_gather_by_runs_equals_gather_by_rows(engine):
    ids, refs = _rag(engine)
    ids = np.concatenate([ids[:30], [7, 7, 7], ids[30:]])  # an unmapped stretch inside a run
    m = engine.map_to_sources(ids, refs)
    assert (m.source < 0).any() and len(m.runs()[0]) > 3
    want = _gather_by_rows(engine, refs, m)
    assert torch.equal(engine.gather_sources(refs, m), want)
    assert torch.equal(engine.gather_sources(refs, m, [r.to_torch() for r in refs]), want)
    # layers below from_layer are left zero, the others are the same
    skip = engine.gather_sources(refs, m, from_layer=1)
    assert torch.equal(skip[1:], want[1:]) and not skip[0].any()


def test_multi_hit_skipping_layer0_gather_changes_nothing(engine, monkeypatch):
    ids, refs = _rag(engine)
    hit = engine.prefill_multi(ids, refs)
    gather = engine.gather_sources
    monkeypatch.setattr(engine, "gather_sources", lambda *a, **kw: gather(*a, **{**kw, "from_layer": 0}))
    again = engine.prefill_multi(ids, refs)
    assert torch.equal(hit.logits, again.logits)
    for l in range(engine.num_layers):
        assert torch.equal(hit.keys[l], again.keys[l]) and torch.equal(hit.values[l], again.values[l])


def test_bad_sources_are_dropped_and_the_hit_goes_on(engine):
    ids, refs = _rag(engine)
    alien = dataclasses.replace(refs[1], signature=dataclasses.replace(refs[1].signature, weights="0" * 16))
    wrong_kv = torch.zeros(1, 2, 3)
    hit = engine.prefill_multi(ids, [refs[0], alien, "garbage", refs[2], refs[1]],
                               sources_kv=[None, None, None, None, wrong_kv])
    assert hit.stats.hit
    st_ = hit.stats.sources
    assert [s["dropped"] is not None for s in st_] == [False, True, True, False, True]
    assert "different model" in st_[1]["dropped"]
    assert st_[0]["used"] and st_[3]["used"] and not st_[1]["used"]
    assert torch.isfinite(hit.logits).all()
    # nothing usable left: a full prefill
    miss = engine.prefill_multi(ids, [alien])
    assert not miss.stats.hit and torch.equal(miss.logits, engine.prefill(ids).logits)


def test_max_sources_limits_what_is_read(engine):
    ids, refs = _rag(engine)
    hit = engine.prefill_multi(ids, refs, engine.config.with_(max_sources=2))
    assert [s["dropped"] is None for s in hit.stats.sources] == [True, True, False]
    assert not hit.stats.sources[2]["used"]


def test_one_source_is_exactly_the_single_reference_path(engine):
    ids, refs = _rag(engine)
    for cfg in (engine.config, engine.config.with_(recompute_ratio=0.0)):
        a = engine.prefill(ids, refs[0], cfg)
        b = engine.prefill_multi(ids, [refs[0]], cfg)
        assert torch.equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.mapping.ref_index, b.mapping.ref_index)
        assert a.stats.rows_per_layer == b.stats.rows_per_layer
        assert b.stats.sources[0]["used"]


def test_boundary_rows_are_forced(engine):
    ids, refs = _rag(engine)
    base = engine.prefill_multi(ids, refs, engine.config.with_(boundary_rows=0))
    assert base.stats.mapping["boundary"] == 0
    more = engine.prefill_multi(ids, refs, engine.config.with_(boundary_rows=4))
    assert more.stats.mapping["boundary"] > 0
    assert more.stats.rows_per_layer[1] >= base.stats.rows_per_layer[1]


def test_source_recompute_floor_raises_deep_layers_of_several_sources_only(engine):
    ids, refs = _rag(engine)
    cfg = engine.config.with_(recompute_ratio=0.2, recompute_decay=0.5, recompute_floor=0.05, boundary_rows=0)
    low = engine.prefill_multi(ids, refs, cfg.with_(source_recompute_floor=0.05))
    high = engine.prefill_multi(ids, refs, cfg.with_(source_recompute_floor=0.3))
    L = engine.num_layers
    assert low.stats.hit and high.stats.hit
    # a floor at or below recompute_floor is the plain schedule
    same = engine.prefill_multi(ids, refs, cfg.with_(source_recompute_floor=0.0))
    assert same.stats.rows_per_layer == low.stats.rows_per_layer and torch.equal(same.logits, low.logits)
    n = ids.size
    for l in range(1, L):
        assert high.stats.rows_per_layer[l] >= low.stats.rows_per_layer[l]
        assert high.stats.rows_per_layer[l] >= min(n, int(np.ceil(0.3 * n)))
    assert high.stats.rows_per_layer[L - 1] > low.stats.rows_per_layer[L - 1]
    # one source: the single-reference path, whatever the several-source floor
    for c in (cfg.with_(source_recompute_floor=0.05), cfg.with_(source_recompute_floor=0.3)):
        one = engine.prefill_multi(ids, refs[:1], c)
        ref = engine.prefill(ids, refs[0], cfg)
        assert torch.equal(one.logits, ref.logits) and one.stats.rows_per_layer == ref.stats.rows_per_layer


# index --------------------------------------------------------------------------------
def test_lookup_sources_covers_a_rag_prompt_and_keeps_single_cover_single():
    rng = np.random.default_rng(0)
    passages = [rng.integers(0, 5000, 120) for _ in range(9)]
    instr = np.arange(5000, 5010)
    idx = SemanticIndex(4096)
    for e in range(3):
        toks = np.concatenate([instr, *passages[3 * e:3 * e + 3]])
        idx.add(f"e{e}", prompt_vector(toks), toks, 10, e)
    # one entry covers it (an edited copy of e1): exactly lookup's answer, alone
    same = np.concatenate([instr, passages[3], passages[4], passages[5][:100], rng.integers(0, 5000, 20)])
    single = idx.lookup_sources(prompt_vector(same), same, threshold=0.3)
    assert [m.entry.key for m in single.matches] == [idx.lookup(prompt_vector(same), threshold=0.3).entry.key]
    # one passage of each: three sources
    rag = np.concatenate([instr, passages[1], passages[5], passages[6], rng.integers(0, 5000, 10)])
    cover = idx.lookup_sources(prompt_vector(rag), rag, threshold=0.3, min_sim=0.05)
    assert sorted(m.entry.key for m in cover.matches) == ["e0", "e1", "e2"]
    assert cover.covered > 0.85 and cover.coverage_any >= cover.covered
    assert all(g >= 0.05 for g in cover.gains)
    # max_sources=1 is a plain top-1 with the coverage rule
    one = idx.lookup_sources(prompt_vector(rag), rag, threshold=0.3, min_sim=0.05, max_sources=1)
    assert one is None or len(one.matches) == 1
    # unrelated prompt: miss
    other = rng.integers(6000, 9000, 300)
    assert idx.lookup_sources(prompt_vector(other), other) is None


def test_config_validates_source_fields():
    with pytest.raises(ValueError):
        SemShareConfig(max_sources=0)
    with pytest.raises(ValueError):
        SemShareConfig(source_min_gain=1.5)
    with pytest.raises(ValueError):
        SemShareConfig(boundary_rows=-1)
    with pytest.raises(ValueError):
        SemShareConfig(source_recompute_floor=1.5)
