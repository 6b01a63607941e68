"""The pair generator (determinism, edit ratios) and the quality metrics on known strings."""
from __future__ import annotations

import math
import random

import pytest

from benchmarks import dataset
from benchmarks.metrics import lcs_length, perplexity, rouge_l, words


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


def test_rouge_l_known_cases():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("alpha beta gamma", "delta epsilon") == 0.0
    # LCS "the cat on the mat" = 5 of 6 words each way: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS a b c = 3: P = 3/3, R = 3/6 -> F = 2/3
    assert rouge_l("a b c", "a x b y c z") == pytest.approx(2 / 3)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("word", "") == 0.0
    assert rouge_l("The Cat!", "the cat") == 1.0  # lower-cased word tokens


def test_lcs_and_words_and_perplexity():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1]) == 0
    assert words("Hello, World 42") == ["hello", "world", "42"]
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(4 * math.log(2), 4) == pytest.approx(2.0)
