"""The prose pair generator (determinism, edit ratios) and the timing / quality statistics on known numbers."""
from __future__ import annotations

import math
import random

import pytest

from benchmarks import dataset
from benchmarks.metrics import agreement, perplexity, ppl_ratio, quantile, round_ratios, speedup_summary, spread


def count_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def docs():
    return dataset.make_documents(2, 300, count_words, seed=0)


def test_same_seed_same_pairs(docs):
    edits = ["replace", "mixed", "instruction"]
    a = dataset.make_pairs(docs, edits, [0.1, 0.3, 0.5], seed=0)
    b = dataset.make_pairs(dataset.make_documents(2, 300, count_words, seed=0), edits, [0.1, 0.3, 0.5], seed=0)
    assert a == b
    assert len(a) == 2 * (2 * 3 + 1)


def test_different_seed_different_pairs(docs):
    assert dataset.make_documents(2, 300, count_words, seed=1) != docs
    a = dataset.make_pairs(docs, ["replace", "mixed"], [0.3], seed=0)
    b = dataset.make_pairs(docs, ["replace", "mixed"], [0.3], seed=1)
    assert [p.reference for p in a] == [p.reference for p in b]
    assert [p.variant for p in a] != [p.variant for p in b]


def test_documents_reach_target(docs):
    for sents in docs:
        n = sum(count_words(s) + 1 for s in sents)
        assert n >= 0.8 * 300


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_edit_ratios_respected(docs, ratio):
    sents = docs[0]
    pool = [s for t in dataset._topic_sentences()[-40:] for s in t]
    k = max(1, round(ratio * len(sents)))
    rng = random.Random(0)
    rep = dataset.edit_sentences(sents, "replace", ratio, rng, pool)
    assert len(rep) == len(sents)
    changed = sum(a != b for a, b in zip(rep, sents))
    assert k - 1 <= changed <= k  # a replacement may (rarely) draw an identical sentence
    assert len(dataset.edit_sentences(sents, "delete", ratio, random.Random(0), pool)) == len(sents) - k
    assert len(dataset.edit_sentences(sents, "insert", ratio, random.Random(0), pool)) == len(sents) + k
    reo = dataset.edit_sentences(sents, "reorder", ratio, random.Random(0), pool)
    assert sorted(reo) == sorted(sents)
    assert sum(a != b for a, b in zip(reo, sents)) <= k


def test_instruction_edit_keeps_document(docs):
    (pair,) = dataset.make_pairs(docs[:1], ["instruction"], [0.3], seed=0)
    assert pair.ratio == 0.0
    assert pair.reference.split("\n\n", 1)[1] == pair.variant.split("\n\n", 1)[1]
    assert pair.reference.split("\n\n", 1)[0] != pair.variant.split("\n\n", 1)[0]


def test_quantile_and_spread():
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([10, 0, 5], 0.0) == 0 and quantile([10, 0, 5], 1.0) == 10
    assert quantile([1, 2, 3, 4, 5], 0.25) == 2.0 and quantile([1, 2, 3, 4], 0.25) == pytest.approx(1.75)
    s = spread([5.0, 1.0, 3.0, 9.0, 7.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["iqr"]) == (5.0, 1.0, 9.0, 3.0, 7.0, 4.0)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_round_ratios_pair_rounds_not_medians():
    full = [100.0, 200.0, 100.0, 300.0, 100.0]   # the machine slows down in rounds 2 and 4
    hit = [50.0, 100.0, 25.0, 150.0, 50.0]        # ... and the hit with it
    assert round_ratios(full, hit) == [2.0, 2.0, 4.0, 2.0, 2.0]
    s = speedup_summary(full, hit)
    assert (s["speedup"], s["speedup_min"], s["speedup_max"]) == (2.0, 2.0, 4.0)
    # the ratio of medians would differ (100 / 50 = 2 here, but not in general):
    assert speedup_summary([100, 300, 100], [50, 50, 100])["speedup"] == 2.0
    with pytest.raises(ValueError):
        round_ratios([1.0], [1.0, 2.0])


def test_agreement_and_ppl_ratio():
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert agreement([7], [7]) == 1.0
    with pytest.raises(ValueError):
        agreement([1], [1, 2])
    assert ppl_ratio(10.0, 10.0, 5) == 1.0
    assert ppl_ratio(10.0 + 4 * math.log(2), 10.0, 4) == pytest.approx(2.0)
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(4 * math.log(2), 4) == pytest.approx(2.0)
