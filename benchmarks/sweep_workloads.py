"""Offline prompts for the concurrency sweep (``python -m benchmarks.load --workload ...``).

Every prompt is cut from one seeded stream of ``benchmarks.dataset`` prose sentences in
which each sentence is handed out once, so no two requests of a run share text unless
the workload says so (a reuse family's repeats and variants). The stream is carved in
a fixed order that does not depend on which workloads are run: the replacement pool
first, then per concurrency level the decode prompts and the reuse families, then the
``repeat`` prompts. Two runs with the same seed and sizes send the same prompts, so our
server and a peer see identical workloads.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from . import dataset

CountTokens = Callable[[str], int]


class OutOfProse(ValueError):
    pass


class SentenceStream:
    """The corpus' sentences in a seeded order, each handed out at most once."""

    def __init__(self, count_tokens: CountTokens, seed: int = 0, sentences: list[str] | None = None):
        if sentences is None:
            topics = dataset._topic_sentences()
            order = list(range(len(topics)))
            random.Random(seed).shuffle(order)
            sentences = [s for i in order for s in topics[i]]
        self._sents = sentences
        self._pos = 0
        self._count = count_tokens

    @property
    def used(self) -> int:
        return self._pos

    def take(self, target_tokens: int) -> list[str]:
        """Consecutive unused sentences totalling about ``target_tokens`` tokens."""
        out, ntok = [], 0
        while ntok < target_tokens:
            if self._pos >= len(self._sents):
                raise OutOfProse(f"the corpus ran out after {self._pos} sentences; use fewer or shorter prompts")
            s = self._sents[self._pos]
            self._pos += 1
            out.append(s)
            ntok += self._count(s) + 1
        return out

    def take_sentences(self, n: int) -> list[str]:
        if self._pos + n > len(self._sents):
            raise OutOfProse("the corpus ran out of sentences")
        out = self._sents[self._pos:self._pos + n]
        self._pos += n
        return out


@dataclass
class Family:
    """A document (the reference), its edited variants and its verbatim repeats."""

    reference: str
    variants: list[str]
    repeats: list[str]
    ratios: list[float] = field(default_factory=list)


@dataclass
class LevelPrompts:
    concurrency: int
    decode: list[str]
    families: list[Family]


@dataclass
class SweepPrompts:
    levels: dict[int, LevelPrompts]
    repeat: dict[int, list[str]]  # prompt length -> fresh prompts (each sent twice)


def decode_count(concurrency: int, per_client: int, minimum: int) -> int:
    return max(minimum, per_client * concurrency)


def family_count(concurrency: int, rounds: int, variants: int, repeats: int, minimum: int) -> int:
    """Enough families that the follow-ups give every client ``rounds`` requests."""
    per_family = max(1, variants + repeats)
    return max(minimum, math.ceil(rounds * concurrency / per_family))


def make_family(sents: list[str], variants: int, repeats: int, rng: random.Random, pool: list[str],
                ratios: tuple[float, ...] = (0.1, 0.2, 0.3)) -> Family:
    ref = dataset.build_prompt(sents)
    vs, rs = [], []
    for _ in range(variants):
        ratio = rng.choice(ratios)
        edited = dataset.edit_sentences(sents, "replace", ratio, rng, pool)
        vs.append(dataset.build_prompt(edited))
        rs.append(ratio)
    return Family(reference=ref, variants=vs, repeats=[ref] * repeats, ratios=rs)


def build_sweep(count_tokens: CountTokens, concurrency: list[int], *, seed: int = 0,
                decode_tokens: int = 100, decode_per_client: int = 2, decode_min: int = 8,
                reuse_tokens: int = 1024, variants: int = 2, repeats: int = 1, rounds: int = 1,
                families_min: int = 2, repeat_lengths: tuple[int, ...] = (1024, 2048), repeat_n: int = 5,
                pool_sentences: int = 120, sentences: list[str] | None = None) -> SweepPrompts:
    stream = SentenceStream(count_tokens, seed, sentences)
    pool = stream.take_sentences(pool_sentences)
    rng = random.Random(f"sweep:{seed}")
    levels = {}
    for c in concurrency:
        decode = [dataset.build_prompt(stream.take(decode_tokens))
                  for _ in range(decode_count(c, decode_per_client, decode_min))]
        fams = [make_family(stream.take(reuse_tokens), variants, repeats, rng, pool)
                for _ in range(family_count(c, rounds, variants, repeats, families_min))]
        levels[c] = LevelPrompts(c, decode, fams)
    repeat = {n: [dataset.build_prompt(stream.take(n)) for _ in range(repeat_n)] for n in repeat_lengths}
    return SweepPrompts(levels, repeat)


def reuse_phases(fams: list[Family], seed: int | str = 0) -> tuple[list[dict], list[dict]]:
    """(references, follow-ups): the references all complete before the follow-ups are sent;
    the follow-ups (variants and repeats of every family) are shuffled together."""
    first = [{"kind": "reference", "family": i, "prompt": f.reference} for i, f in enumerate(fams)]
    rest = []
    for i, f in enumerate(fams):
        rest += [{"kind": "variant", "family": i, "prompt": p, "ratio": r} for p, r in zip(f.variants, f.ratios)]
        rest += [{"kind": "repeat", "family": i, "prompt": p} for p in f.repeats]
    random.Random(f"phases:{seed}").shuffle(rest)
    return first, rest
