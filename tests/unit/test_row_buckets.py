"""Bucketed row counts in a hit's per-layer loop (issue 16, item 8: a loop an accelerator can capture).

With ``row_bucket = b`` every layer >= 1 recomputes a multiple of ``b`` rows (or the
whole prompt), so the loop sees a few fixed shapes; extra rows are filled with the
best-scored unchanged rows, and recomputing a row is always exact. ``row_bucket = 1`` is
the unbucketed loop (the default)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core import SemShareConfig, SemShareEngine
from semshare_core.models import tiny_random_model
from semshare_core.prefill import _select

from .test_selective_syncs import ReadBackCounter
from .tiny import prose, tokenizer

BASE = dict(window=1, recompute_min_tokens=0, recompute_ratio=0.5, recompute_floor=0.1, recompute_decay=0.8,
            attention_chunks=1)


def _engine(**cfg) -> SemShareEngine:
    tok = tokenizer()
    model = tiny_random_model("llama", vocab_size=len(tok), layers=8)
    return SemShareEngine(model, tok, SemShareConfig(**{**BASE, **cfg}), prepack=False)


def _pair(tok):
    text = " ".join(prose(0, 14))
    edited = text.replace(prose(3, 1)[0], prose(40, 1)[0])
    return np.asarray(tok(text)["input_ids"]), np.asarray(tok(edited)["input_ids"])


def test_the_default_is_unbucketed_and_the_rounding_is_whole_buckets():
    cfg = SemShareConfig()
    assert cfg.row_bucket == 1
    b64 = SemShareConfig(row_bucket=64)
    assert b64.bucketed(65, 1000) == 128 and b64.bucketed(65, 100) == 100 and cfg.bucketed(7, 9) == 7
    with pytest.raises(ValueError):
        SemShareConfig(row_bucket=0)


def test_every_layer_recomputes_whole_buckets_and_the_hit_stays_close_to_unbucketed():
    plain, bucketed = _engine(), _engine(row_bucket=16)
    bucketed.model.load_state_dict(plain.model.state_dict())
    ref_ids, ids = _pair(plain.tokenizer)
    n = len(ids)
    ref = plain.export_kv(plain.prefill(ref_ids))
    a = plain.prefill(ids, reference=ref)
    b = bucketed.prefill(ids, reference=ref)
    assert a.stats.hit and b.stats.hit
    rows_a, rows_b = a.stats.rows_per_layer, b.stats.rows_per_layer
    assert rows_a[0] == rows_b[0] == n
    assert all(r % 16 == 0 or r == n for r in rows_b[1:]), rows_b
    assert any(r % 16 for r in rows_a[1:]), f"unbucketed counts happened to be multiples: {rows_a}"
    assert all(rb >= ra for ra, rb in zip(rows_a, rows_b)), (rows_a, rows_b)   # buckets only add rows
    assert len(set(rows_b)) <= len(set(rows_a))
    full = plain.prefill(ids)
    ga, gb = (torch.softmax(x.logits.float(), -1) for x in (a, b))
    gf = torch.softmax(full.logits.float(), -1)
    # more recomputed rows never move the hit further from the full prefill than a little noise
    assert (gb - gf).abs().sum() <= (ga - gf).abs().sum() + 0.05


def test_bucketed_exact_rows_equal_a_full_prefill():
    """An identical prompt's rows are exact: whichever rows a bucket adds, the logits are a full prefill's."""
    eng = _engine(row_bucket=16, replay_exact=False)
    ref_ids, _ = _pair(eng.tokenizer)
    ref = eng.export_kv(eng.prefill(ref_ids))
    hit = eng.prefill(ref_ids, reference=ref)
    assert hit.stats.hit
    torch.testing.assert_close(hit.logits, eng.prefill(ref_ids).logits, atol=1e-4, rtol=1e-4)


def test_fill_keeps_candidates_first_then_the_best_unchanged_rows():
    score = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2])
    candidate = torch.tensor([False, True, False, True, False, False])
    forced = torch.tensor([False, False, False, False, False, True])
    assert _select(score, candidate, forced, 3).tolist() == [1, 3, 5]          # at most the eligible rows
    assert _select(score, candidate, forced, 5, fill=True).tolist() == [0, 1, 3, 4, 5]
    with ReadBackCounter() as c:   # counts given by the caller: nothing read back, with or without fill
        _select(score, candidate, forced, 4, n_forced=1, fill=True)
    assert c.calls == []


def test_bucketed_loop_reads_back_no_more_than_the_unbucketed_one():
    from .test_selective_syncs import _read_backs

    def engine(layers: int) -> SemShareEngine:
        tok = tokenizer()
        model = tiny_random_model("llama", vocab_size=len(tok), layers=layers)
        return SemShareEngine(model, tok, SemShareConfig(**{**BASE, "row_bucket": 16}), prepack=False)

    shallow, deep = _read_backs(engine(4)), _read_backs(engine(12))
    assert shallow and len(deep) == len(shallow) and len(deep) <= 3, (shallow, deep)
