"""The interleaved-rounds driver's pure parts: spreads, per-round ratios and the table."""
from __future__ import annotations

import pytest

from benchmarks import interleave


def _level(tps, rps, ttft=100.0, itl=50.0):
    return {"tokens_per_s": tps, "requests_per_s": rps, "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft,
            "itl_p50_ms": itl, "itl_p99_ms": 3 * itl}


def test_ratios_are_per_round_not_ratios_of_medians():
    rounds = [{"ours": _level(50, 0.5), "peer": _level(100, 1.0)},
              {"ours": _level(60, 0.6), "peer": _level(60, 0.6)},    # a round where the box was slow for the peer
              {"ours": _level(40, 0.4), "peer": _level(100, 1.0)}]
    s = interleave.summarize(rounds)
    assert s["ours"]["tokens_per_s"] == {"median": 50, "min": 40, "max": 60, "n": 3}
    assert s["ratio"]["tokens_per_s"]["per_round"] == [0.5, 1.0, 0.4]
    assert s["ratio"]["tokens_per_s"]["median"] == 0.5          # median of the per-round ratios
    assert s["ratio"]["requests_per_s"]["min"] == 0.4 and s["ratio"]["requests_per_s"]["max"] == 1.0


def test_markdown_lists_every_round_and_metric():
    rounds = [{"ours": _level(50, 0.5), "peer": _level(100, 1.0)}, {"ours": _level(55, 0.5), "peer": _level(110, 1.1)}]
    res = {"name": "t", "ours": "u1", "peer": "u2", "peer_label": "p", "workload": "decode", "concurrency": 8,
           "rounds": 2, "per_round": rounds, "summary": interleave.summarize(rounds)}
    md = interleave.markdown(res)
    assert "\n| 1 | ours | 50.0 | 100.0 | 0.50 |" in md and "\n| 2 | ours | 55.0 | 110.0 | 0.50 |" in md
    md = interleave.markdown({**res, "order": "alternate"})
    assert "\n| 1 | ours | 50.0 |" in md and "\n| 2 | peer | 55.0 |" in md
    for m in interleave.METRICS:
        assert f"\n| {m} |" in md


def test_alternate_order_swaps_who_runs_first_each_round():
    firsts = [interleave.round_order("alternate", r)[0] for r in range(1, 6)]
    assert firsts == ["ours", "peer", "ours", "peer", "ours"]
    assert all(interleave.round_order("ours-first", r) == ("ours", "peer") for r in range(1, 4))
    assert all(interleave.round_order("peer-first", r) == ("peer", "ours") for r in range(1, 4))
    with pytest.raises(ValueError):
        interleave.round_order("random", 1)
