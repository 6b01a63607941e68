"""Similar-prompt pairs built offline from prose that ships with CPython.

Source: ``pydoc_data.topics`` (the Python language reference, ~900 KB of English).
Documents are runs of consecutive topics cut to a token budget. Variants are made
by a seeded generator that edits a share of the document's sentences:

* ``replace``: a sentence is swapped for a sentence from another topic;
* ``delete``:  a sentence is removed;
* ``insert``:  a sentence from another topic is inserted after it;
* ``reorder``: the chosen sentences are shuffled among their own slots;
* ``mixed``:   each chosen sentence gets one of the four at random.

A prompt is ``"<instruction>\n\n<document>"`` with the instruction "Summarize the
following text." or "List the key points of the following text."; the
``instruction`` edit keeps the document and changes only the instruction.
Same ``seed`` -> same documents and variants (``random.Random`` only).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

import pydoc_data.topics

EditKind = Literal["replace", "delete", "insert", "reorder", "mixed", "instruction"]
EDIT_KINDS: tuple[str, ...] = ("replace", "delete", "insert", "reorder", "mixed", "instruction")
INSTRUCTIONS = ("Summarize the following text.", "List the key points of the following text.")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (whitespace-normalised, no empty ones)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENT.split(flat) if s]


def _topic_sentences() -> list[list[str]]:
    topics = pydoc_data.topics.topics
    out = []
    for key in sorted(topics):
        sents = [s for s in split_sentences(topics[key]) if 20 <= len(s) <= 600]
        if len(sents) >= 3:
            out.append(sents)
    return out


@dataclass(frozen=True)
class PromptPair:
    """A reference prompt and an edited variant of it."""

    doc_id: int
    edit: str
    ratio: float
    reference: str
    variant: str


def make_documents(count: int, target_tokens: int, count_tokens: Callable[[str], int],
                   seed: int = 0) -> list[list[str]]:
    """``count`` documents (lists of sentences) of about ``target_tokens`` tokens each.

    Documents start at different seeded topics so they do not overlap.
    """
    topics = _topic_sentences()
    rng = random.Random(seed)
    starts = rng.sample(range(len(topics)), k=min(count * 4, len(topics)))
    docs, used = [], set()
    for s in starts:
        if len(docs) == count:
            break
        if s in used:
            continue
        sents, i, ntok = [], s, 0
        while ntok < target_tokens and i < len(topics):
            if i in used:
                break
            used.add(i)
            for sent in topics[i]:
                if ntok >= target_tokens:
                    break
                sents.append(sent)
                ntok += count_tokens(sent) + 1
            i += 1
        if ntok >= 0.8 * target_tokens:
            docs.append(sents)
    if len(docs) < count:
        raise ValueError(f"only {len(docs)} documents of ~{target_tokens} tokens could be cut")
    return docs


def edit_sentences(sents: list[str], kind: str, ratio: float, rng: random.Random,
                   pool: list[str]) -> list[str]:
    """Apply ``kind`` to ``round(ratio * len(sents))`` seeded-chosen sentences."""
    if kind == "instruction" or ratio <= 0:
        return list(sents)
    k = max(1, round(ratio * len(sents)))
    chosen = sorted(rng.sample(range(len(sents)), k=min(k, len(sents))))
    out = list(sents)
    if kind == "reorder":
        moved = [out[i] for i in chosen]
        rng.shuffle(moved)
        for i, s in zip(chosen, moved):
            out[i] = s
        return out
    result = []
    chosen_set = set(chosen)
    for i, s in enumerate(out):
        op = kind if kind != "mixed" else rng.choice(("replace", "delete", "insert", "reorder"))
        if i not in chosen_set:
            result.append(s)
        elif op == "replace":
            result.append(rng.choice(pool))
        elif op == "delete":
            continue
        elif op == "insert":
            result.extend([s, rng.choice(pool)])
        else:  # reorder inside mixed: move the sentence to a random later slot
            result.append(s)
            j = rng.randrange(len(result))
            result.insert(j, result.pop())
    return result


def build_prompt(sents: list[str], instruction: str = INSTRUCTIONS[0]) -> str:
    return instruction + "\n\n" + " ".join(sents)


def make_pairs(docs: list[list[str]], edits: list[str], ratios: list[float], seed: int = 0) -> list[PromptPair]:
    """One variant per (document, edit kind, ratio); ``instruction`` ignores ratios."""
    pool = [s for sents in _topic_sentences()[-40:] for s in sents]
    pairs = []
    for d, sents in enumerate(docs):
        ref = build_prompt(sents)
        for kind in edits:
            for ratio in ([0.0] if kind == "instruction" else ratios):
                rng = random.Random(f"{seed}:{d}:{kind}:{ratio}")
                var_sents = edit_sentences(sents, kind, ratio, rng, pool)
                instr = INSTRUCTIONS[1] if kind == "instruction" else INSTRUCTIONS[0]
                pairs.append(PromptPair(d, kind, ratio, ref, build_prompt(var_sents, instr)))
    return pairs
