"""Edits that matter: documents carrying facts, variants that change a few of them.

A document is prose (consecutive sentences of CPython's ``pydoc_data.topics``, as in
:mod:`benchmarks.dataset`) with fact sentences about a few depots inserted at seeded
random places, e.g.::

    The access code of the Lyon depot is 4711.    The Lyon depot is managed by Alice Moreau.
    The Porto depot opened on 12 March 2009.      The Porto depot holds 382 crates.

Every depot has an access code and one or two more facts. Everything is built offline by
a seeded ``random.Random``. Every value that can be asked about is unique in its
document (access codes: 4 digits outside 1900-2099, never a year; stocks: 3 digits;
manager surnames: distinct), so an answer stating a value can only come from that fact.
(Dense registers of dozens of similar records, one per line, were tried first:
SmolLM2-135M-Instruct then answered almost never correctly even with a full prefill.)

A pair: the *reference* prompt is the document followed by a direct question ("What is
the access code of the Lyon depot? Answer with the number only."). The *variant* changes
2-3 values: the asked one (a value never present in the reference) plus 1-2 facts of other
depots, and asks the same question. Filler, fact positions and wording stay the same. A
reuse method that keeps the reference's K/V for the changed fact may answer with the
reference's value: the **stale** answer.

Scoring (:func:`score_answer`): an answer is *correct* when it states the variant's value,
*stale* when it states the reference's value (numbers: as a whole number, not inside a
longer one; names: the surname as a whole word, case-insensitive).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

CITIES = ("Lyon", "Porto", "Ghent", "Bremen", "Turin", "Krakow", "Seville", "Utrecht", "Graz", "Brno", "Leeds",
          "Aarhus", "Nantes", "Bilbao", "Bergen", "Malmo", "Dresden", "Genoa", "Lille", "Cork", "Tampere", "Basel",
          "Split", "Riga", "Tartu", "Lublin", "Cluj", "Varna", "Patras", "Leipzig", "Bologna", "Toulouse", "Lisbon",
          "Zagreb", "Vilnius", "Linz", "Odense", "Galway", "Murcia", "Verona")
FIRST = ("Alice", "Bruno", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin", "Lukas",
         "Marta", "Nils", "Olga", "Pablo", "Rosa", "Simon", "Tanja", "Victor", "Wanda", "Yusuf", "Zoe", "Anton",
         "Berit", "Carlos", "Dora", "Emil", "Fiona", "Gustav")
SURNAMES = ("Moreau", "Fischer", "Novak", "Silva", "Jensen", "Rossi", "Kowalski", "Dubois", "Weber", "Horvat",
            "Lindqvist", "Costa", "Meyer", "Petrov", "Santos", "Bauer", "Nielsen", "Ricci", "Lambert", "Wagner",
            "Kovacs", "Ferreira", "Hansen", "Greco", "Fontaine", "Schulz", "Popescu", "Marino", "Berger", "Olsen",
            "Dvorak", "Garcia", "Richter", "Bianchi", "Laurent", "Wolff", "Nowak", "Pereira", "Larsen", "Conti",
            "Girard", "Keller", "Horak", "Moreno", "Koch", "Bruno", "Mercier", "Vogel", "Sorensen", "Gallo",
            "Roux", "Brandt", "Blazek", "Navarro", "Frank", "Esposito", "Leclerc", "Hofmann", "Dahl", "Romano",
            "Faure", "Kruger", "Sedlak", "Ortega", "Hartmann", "Colombo", "Renard", "Lorenz", "Lund", "Marchetti",
            "Perrin", "Schmitt", "Urban", "Ramos", "Engel", "Serra", "Blanc", "Kaiser", "Berg", "Villa",
            "Chevalier", "Franke", "Zeman", "Molina", "Busch", "Leone", "Guerin", "Seidel", "Holm", "Fabbri")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
ATTRIBUTES = ("code", "manager", "opened", "stock")
# The asked attribute of pair i is ASKED_CYCLE[i % len(ASKED_CYCLE)]. Only access codes by default:
# with a full prefill SmolLM2-135M-Instruct answered 3 of 4 code questions at ~1k tokens but
# 0 of 4 manager / stock questions (one measurement); ``make_fact_pair(asked=...)`` asks the others.
ASKED_CYCLE = ("code",)
QUESTIONS = {
    "code": "What is the access code of the {city} depot? Answer with the number only.",
    "stock": "How many crates does the {city} depot hold? Answer with the number only.",
    "manager": "Who manages the {city} depot? Answer with the name only.",
}
SENTENCES = {
    "code": "The access code of the {city} depot is {value}.",
    "manager": "The {city} depot is managed by {value}.",
    "opened": "The {city} depot opened on {value}.",
    "stock": "The {city} depot holds {value} crates.",
}
TOKENS_PER_DEPOT = 170   # one depot per ~170 tokens of document (4 at 1k... capped at MAX_DEPOTS)
MAX_DEPOTS = 12


@dataclass(frozen=True)
class Fact:
    city: str
    attribute: str
    value: str

    def render(self) -> str:
        return SENTENCES[self.attribute].format(city=self.city, value=self.value)


@dataclass(frozen=True)
class FactChange:
    city: str
    attribute: str
    old: str
    new: str


@dataclass(frozen=True)
class FactPair:
    """A fact document and its edited variant. ``reference``/``variant``: the prompt texts
    (document + question); ``*_sentences``: the documents as sentence lists (same length,
    facts at ``fact_positions``); ``changes[0]`` is the asked fact."""

    doc_id: int
    reference: str
    variant: str
    question: str
    reference_sentences: tuple[str, ...]
    variant_sentences: tuple[str, ...]
    fact_positions: tuple[int, ...]
    changes: tuple[FactChange, ...]
    edit: str = "facts"
    ratio: float = 0.0
    source: str = "facts"

    @property
    def asked(self) -> FactChange:
        return self.changes[0]


def render(sentences, question: str) -> str:
    return " ".join(sentences) + "\n\n" + question


class _Values:
    """Draws values unique within one document."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}

    def draw(self, attribute: str) -> str:
        rng, used = self.rng, self.used[attribute]
        for _ in range(100000):
            if attribute == "code":
                v = str(rng.randrange(2100, 10000))
            elif attribute == "stock":
                v = str(rng.randrange(100, 1000))
            elif attribute == "opened":
                v = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1985, 2020)}"
            else:
                surnames = {u.split()[-1] for u in used}
                v = f"{rng.choice(FIRST)} {rng.choice([x for x in SURNAMES if x not in surnames])}"
            if v not in used:
                used.add(v)
                return v
        raise RuntimeError(f"no fresh {attribute} value left")


def make_fact_pair(doc_id: int, target_tokens: int, count_tokens: Callable[[str], int], seed: int = 0,
                   asked: str | None = None) -> FactPair:
    """One document of about ``target_tokens`` tokens (document + question) and its variant.

    ``asked``: the asked attribute (default ``ASKED_CYCLE[doc_id % len(ASKED_CYCLE)]``).
    """
    from . import dataset

    rng = random.Random(f"facts:{seed}:{doc_id}:{target_tokens}")
    values = _Values(rng)
    attr = asked or ASKED_CYCLE[doc_id % len(ASKED_CYCLE)]
    if attr not in QUESTIONS:
        raise ValueError(f"cannot ask about {attr!r}; choose from {sorted(QUESTIONS)}")
    n_depots = max(3, min(MAX_DEPOTS, target_tokens // TOKENS_PER_DEPOT))
    cities = rng.sample(CITIES, n_depots)
    facts = []
    for i, city in enumerate(cities):
        extra = rng.sample(("manager", "opened", "stock"), k=rng.choice((1, 2)))
        if i == 0 and attr != "code" and attr not in extra:
            extra[0] = attr  # the asked depot (cities[0]) has the asked attribute
        facts += [Fact(city, a, values.draw(a)) for a in ["code", *extra]]
    fact_tokens = sum(count_tokens(f.render()) + 1 for f in facts)
    question = QUESTIONS[attr].format(city=cities[0])
    budget = max(8, target_tokens - fact_tokens - count_tokens(question) - 2)
    filler = dataset.make_documents(1, budget, count_tokens, seed=f"facts:{seed}:{doc_id}")[0]
    rng.shuffle(facts)
    slots = sorted(rng.sample(range(len(filler) + len(facts)), len(facts)))
    sentences, it_f, it_s = [], iter(facts), iter(filler)
    for i in range(len(filler) + len(facts)):
        sentences.append(next(it_f) if slots and i in slots else next(it_s))
    target = next(f for f in facts if f.city == cities[0] and f.attribute == attr)
    others = [f for f in facts if f.city != cities[0]]
    changed = [target] + rng.sample(others, k=min(len(others), rng.choice((1, 2))))
    new = {f: Fact(f.city, f.attribute, values.draw(f.attribute)) for f in changed}
    ref_s = tuple(x.render() if isinstance(x, Fact) else x for x in sentences)
    var_s = tuple(new.get(x, x).render() if isinstance(x, Fact) else x for x in sentences)
    changes = tuple(FactChange(f.city, f.attribute, f.value, new[f].value) for f in changed)
    return FactPair(doc_id, render(ref_s, question), render(var_s, question), question, ref_s, var_s, tuple(slots),
                    changes)


def make_fact_pairs(count: int, target_tokens: int, count_tokens: Callable[[str], int], seed: int = 0) -> list[FactPair]:
    return [make_fact_pair(i, target_tokens, count_tokens, seed) for i in range(count)]


# scoring -------------------------------------------------------------------------------
def mentions(answer: str, value: str) -> bool:
    """Whether ``answer`` states ``value``: a number as a whole number (digit groups with
    ``,``/``.``/space separators allowed: 4,711), a name by its surname as a whole word,
    anything else as a case-insensitive substring."""
    if value.isdigit():
        flat = re.sub(r"(?<=\d)[,.\s](?=\d{3}(?!\d))", "", answer)
        return re.search(rf"(?<!\d){re.escape(value)}(?!\d)", flat) is not None
    if re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", value):
        return re.search(rf"\b{re.escape(value.split()[-1])}\b", answer, flags=re.IGNORECASE) is not None
    return value.lower() in answer.lower()


def score_answer(answer: str, change: FactChange) -> dict:
    """``correct``: states the variant's value; ``stale``: states the reference's value."""
    return {"correct": mentions(answer, change.new), "stale": mentions(answer, change.old)}
