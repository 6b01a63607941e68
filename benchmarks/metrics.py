"""Quality metrics: ROUGE-L F1 (LCS based), first-token agreement, perplexity ratio."""
from __future__ import annotations

import math
import re
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str | Sequence, reference: str | Sequence) -> float:
    """ROUGE-L F1 between two texts (lower-cased word tokens) or two token sequences."""
    c = words(candidate) if isinstance(candidate, str) else list(candidate)
    r = words(reference) if isinstance(reference, str) else list(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))
