"""Timing and quality statistics: spreads, per-round speedup ratios, teacher-forced agreement.

Pure functions on plain numbers (no torch), so they are tested on hand-made values.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default ``linear`` method) of a non-empty sequence."""
    s = sorted(float(x) for x in xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(xs: Sequence[float]) -> dict:
    """``median``, ``min``, ``max``, ``q1``, ``q3``, ``iqr`` of the values."""
    xs = [float(x) for x in xs]
    q1, q3 = quantile(xs, 0.25), quantile(xs, 0.75)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1, "q3": q3, "iqr": q3 - q1}


def round_ratios(baseline_ms: Sequence[float], method_ms: Sequence[float]) -> list[float]:
    """Per-round speedups ``baseline[r] / method[r]``; both lists are indexed by the same rounds."""
    if len(baseline_ms) != len(method_ms):
        raise ValueError(f"{len(baseline_ms)} baseline rounds vs {len(method_ms)} method rounds")
    return [b / m for b, m in zip(baseline_ms, method_ms)]


def speedup_summary(baseline_ms: Sequence[float], method_ms: Sequence[float], key: str = "speedup") -> dict:
    """Median (and min/max) of the per-round ratios: noise shared by one round cancels."""
    ratios = round_ratios(baseline_ms, method_ms)
    s = spread(ratios)
    return {key: s["median"], f"{key}_min": s["min"], f"{key}_max": s["max"], f"{key}_rounds": ratios}


def agreement(argmaxes: Sequence[int], target: Sequence[int]) -> float:
    """Share of teacher-forced steps whose argmax equals the target token at that step."""
    if len(argmaxes) != len(target) or not target:
        raise ValueError("agreement needs two equally long, non-empty sequences")
    return sum(int(a) == int(t) for a, t in zip(argmaxes, target)) / len(target)


def ppl_ratio(nll_method: float, nll_full: float, k: int) -> float:
    """``exp((nll_method - nll_full) / k)`` = perplexity of the method / perplexity of full."""
    return math.exp((nll_method - nll_full) / max(k, 1))


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))
