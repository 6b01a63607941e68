"""The fact-edit dataset: variants change exactly the listed facts, the question asks a changed one, scoring."""
from __future__ import annotations

import pytest

from benchmarks import facts


def count_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def pairs():
    asked = ["code", "manager", "stock", None]
    return [facts.make_fact_pair(i, 900, count_words, seed=3, asked=asked[i % 4]) for i in range(8)]


def test_deterministic(pairs):
    assert facts.make_fact_pair(2, 900, count_words, seed=3, asked="stock") == pairs[2]
    assert facts.make_fact_pair(2, 900, count_words, seed=4, asked="stock") != pairs[2]
    assert facts.make_fact_pair(3, 900, count_words, seed=3).asked.attribute == facts.ASKED_CYCLE[3 % len(facts.ASKED_CYCLE)]


def test_variant_differs_exactly_in_the_changed_facts(pairs):
    for p in pairs:
        assert len(p.reference_sentences) == len(p.variant_sentences)
        diff = [i for i, (a, b) in enumerate(zip(p.reference_sentences, p.variant_sentences)) if a != b]
        assert len(diff) == len(p.changes) and 2 <= len(p.changes) <= 3
        assert set(diff) <= set(p.fact_positions)
        for i in diff:  # each changed sentence is the reference sentence with old -> new
            a, b = p.reference_sentences[i], p.variant_sentences[i]
            ch = [c for c in p.changes if c.city in a and c.old in a]
            assert len(ch) == 1 and a.replace(ch[0].old, ch[0].new) == b
        assert p.reference == facts.render(p.reference_sentences, p.question)
        assert p.variant == facts.render(p.variant_sentences, p.question)


def test_question_asks_about_a_changed_value(pairs):
    attrs = set()
    for p in pairs:
        a = p.asked
        attrs.add(a.attribute)
        assert a.city in p.question and p.question == facts.QUESTIONS[a.attribute].format(city=a.city)
        assert p.reference.endswith(p.question) and p.variant.endswith(p.question)
        assert a.old != a.new
        # the old value is stated only in the reference, the new one only in the variant
        assert facts.mentions(p.reference, a.old) and not facts.mentions(p.variant, a.old)
        assert facts.mentions(p.variant, a.new) and not facts.mentions(p.reference, a.new)
    assert {"code", "manager", "stock"} <= attrs


def test_documents_scale_with_length():
    short = facts.make_fact_pair(0, 400, count_words)
    long = facts.make_fact_pair(0, 2000, count_words)
    assert 0.8 * 400 <= count_words(short.variant) <= 1.3 * 400
    assert 0.8 * 2000 <= count_words(long.variant) <= 1.2 * 2000
    assert len(long.fact_positions) > len(short.fact_positions)


def test_scoring_on_hand_made_answers():
    code = facts.FactChange("Lyon", "code", "4711", "9245")
    assert facts.score_answer("9245", code) == {"correct": True, "stale": False}
    assert facts.score_answer("The access code of the Lyon depot is 4711.", code) == {"correct": False, "stale": True}
    assert facts.score_answer("It is 9,245 (formerly 4711).", code) == {"correct": True, "stale": True}
    assert facts.score_answer("92450", code) == {"correct": False, "stale": False}   # not a whole number
    assert facts.score_answer("14711", code) == {"correct": False, "stale": False}
    assert facts.score_answer("9222", code) == {"correct": False, "stale": False}    # garbled: neither
    name = facts.FactChange("Porto", "manager", "Alice Moreau", "Bruno Keller")
    assert facts.score_answer("Bruno Keller", name) == {"correct": True, "stale": False}
    assert facts.score_answer("The depot is managed by MOREAU.", name) == {"correct": False, "stale": True}
    assert facts.score_answer("Kellerman", name) == {"correct": False, "stale": False}
    stock = facts.FactChange("Ghent", "stock", "382", "519")
    assert facts.score_answer("519 crates", stock)["correct"] and not facts.score_answer("1382", stock)["stale"]
