"""Property tests of the target -> reference token mapping."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semshare_core.matching import EXACT_SPAN, EXACT_TOKEN, FUZZY, NONE, align_exact, lsh_match, map_tokens

token_lists = st.lists(st.integers(0, 60), min_size=0, max_size=120)
segments = st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(token_lists, token_lists)
def test_indices_in_range_and_exact_means_same_id(target, reference):
    t, r = np.array(target, dtype=np.int64), np.array(reference, dtype=np.int64)
    m = map_tokens(t, r)
    assert m.ref_index.shape == t.shape and m.kind.shape == t.shape
    if r.size:
        assert ((m.ref_index >= 0) & (m.ref_index < r.size)).all()
    ex = m.exact
    assert (r[m.ref_index[ex]] == t[ex]).all() if ex.any() else True
    assert sum(m.counts.values()) == t.size
    # a token whose id occurs in the reference is never left unmatched
    present = np.isin(t, r)
    assert not (present & (m.kind == NONE)).any()


@settings(max_examples=200, deadline=None)
@given(segments, st.randoms(use_true_random=False))
def test_permutation_of_sentences_maps_every_token_exactly(segs, rnd):
    ref = [tok for s in segs for tok in s]
    order = list(range(len(segs)))
    rnd.shuffle(order)
    tgt = [tok for i in order for tok in segs[i]]
    ri, kind = align_exact(np.array(tgt), np.array(ref))
    assert (kind <= EXACT_TOKEN).all()
    assert (np.array(ref)[ri] == np.array(tgt)).all()


@settings(max_examples=100, deadline=None)
@given(segments, st.integers(0, 11), st.lists(st.integers(100, 140), min_size=1, max_size=6))
def test_insertion_keeps_the_other_spans_aligned(segs, where, inserted):
    ref = [tok for s in segs for tok in s]
    k = min(where, len(segs))
    tgt = [tok for s in segs[:k] for tok in s] + inserted + [tok for s in segs[k:] for tok in s]
    ri, kind = align_exact(np.array(tgt), np.array(ref))
    ins = np.arange(len(tgt))
    ins = (ins >= sum(len(s) for s in segs[:k])) & (ins < sum(len(s) for s in segs[:k]) + len(inserted))
    assert (kind[ins] == NONE).all()           # ids 100+ never occur in the reference
    assert (kind[~ins] <= EXACT_TOKEN).all()


def test_shifted_span_is_one_run():
    ref = np.arange(50)
    tgt = np.concatenate([[99, 98, 97], np.arange(50)])
    ri, kind = align_exact(tgt, ref)
    assert (kind[3:] == EXACT_SPAN).all() and (ri[3:] == np.arange(50)).all()


def test_lsh_prefers_close_vectors_and_rejects_far_ones():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 32, generator=g)
    queries = keys[[5, 17, 123]] + 0.01 * torch.randn(3, 32, generator=g)
    idx, ok = lsh_match(queries, keys, bits=8, tables=8, min_cos=0.9)
    assert ok.all() and idx.tolist() == [5, 17, 123]
    far = -keys[:2]
    _, ok = lsh_match(far, keys[:2], bits=8, tables=8, min_cos=0.5)
    assert not ok.any()


def test_fuzzy_matches_unseen_tokens_with_embeddings():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(100, 16, generator=g)
    ref = np.arange(0, 50)
    tgt = np.concatenate([ref[:10], [60, 61, 62], ref[13:]])
    # the new tokens' embeddings are near the reference tokens they replace, at the same place
    emb[60:63] = emb[10:13] + 0.01
    m = map_tokens(tgt, ref, emb[tgt], emb[ref], lsh_bits=6, lsh_tables=8, fuzzy_min_cos=0.9)
    assert (m.kind[10:13] == FUZZY).all() and m.ref_index[10:13].tolist() == [10, 11, 12]
    assert m.counts["fuzzy"] == 3 and m.counts["none"] == 0


def test_cached_reference_lsh_gives_the_eager_mapping():
    """Lazy embedding + the per-reference LSH tables == embedding and hashing everything each time."""
    from semshare_core.matching import ReferenceLSH

    g = torch.Generator().manual_seed(2)
    emb = torch.randn(400, 32, generator=g)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 200, 300)
    tgt = ref.copy()
    tgt[rng.choice(300, 60, replace=False)] = rng.integers(200, 400, 60)  # unseen ids: fuzzy or none
    emb[200:400] = emb[0:200] + 0.3 * torch.randn(200, 32, generator=g)
    calls = []

    def embed(ids):
        calls.append(len(ids))
        return emb[torch.from_numpy(np.asarray(ids))]

    kw = dict(lsh_bits=6, lsh_tables=6, fuzzy_min_cos=0.6, seed=3)
    eager = map_tokens(tgt, ref, emb[tgt], emb[ref], **kw)
    lsh = ReferenceLSH(ref, embed, kw["lsh_bits"], kw["lsh_tables"], kw["seed"])
    lazy = map_tokens(tgt, ref, embed=embed, reference_lsh=lambda: lsh, **kw)
    assert eager.counts["fuzzy"] > 0 and eager.counts["none"] > 0
    np.testing.assert_array_equal(lazy.kind, eager.kind)
    np.testing.assert_array_equal(lazy.ref_index, eager.ref_index)
    calls.clear()
    map_tokens(ref, ref, embed=embed, reference_lsh=lambda: 1 / 0, **kw)  # nothing left over: nothing embedded
    assert calls == []
