"""The HTTP vs in-process benchmark's bookkeeping (orders, per-round ratios, table); no model, no server."""
from __future__ import annotations

import pytest

from benchmarks.http_vs_inprocess import ACCEPT, MEASURES, markdown, round_orders, summarize_rounds


def test_round_orders_are_seeded_shuffles_of_the_four_measurements():
    a = round_orders(7, 12)
    assert a == round_orders(7, 12) and a != round_orders(8, 12)
    assert len(a) == 12 and all(sorted(o) == sorted(MEASURES) for o in a)
    assert len({tuple(o) for o in a}) > 1  # actually shuffled


def rows(inproc: list[tuple[float, float]], http: list[tuple[float, float]]) -> list[dict]:
    return [{"inproc_full_ms": f, "inproc_hit_ms": h, "http_full_ms": hf, "http_hit_ms": hh, "http_hit_tier": "hot"}
            for (f, h), (hf, hh) in zip(inproc, http)]


def test_summary_takes_medians_and_spreads_of_per_round_ratios():
    s = summarize_rounds(rows([(400, 100), (500, 100), (300, 100)], [(440, 110), (450, 100), (300, 120)]))
    assert s["inprocess"]["ratio"] == {"median": 4.0, "min": 3.0, "max": 5.0, "n": 3}
    assert s["http"]["ratio"]["median"] == pytest.approx(4.0) and s["http"]["ratio"]["min"] == pytest.approx(2.5)
    assert s["http"]["ratio"]["max"] == pytest.approx(4.5) and s["http"]["hit_tiers"] == ["hot"]
    assert s["http_over_inprocess"] == pytest.approx(1.0) and s["accepted"]
    assert s["inprocess"]["full_ms"]["median"] == 400
    worse = summarize_rounds(rows([(400, 100)], [(300, 100)]))
    assert worse["http_over_inprocess"] == pytest.approx(0.75) and 0.75 < ACCEPT and not worse["accepted"]


def test_markdown_table_has_one_row_per_length_with_spreads():
    out = {"config": {"pairs": 1, "rounds": 2, "seed": 0, "threads": 1, "config_source": "serve_config.yaml",
                      "hit_tiers": ["hot"], "machine": "x86_64"},
           "lengths": {"512": {"summary": summarize_rounds(rows([(400, 100), (600, 100)], [(400, 100), (500, 100)]))}}}
    md = markdown(out)
    assert "| ~512 | 500 / 100 | 5.00 [4.00 - 6.00] | 450 / 100 | 4.50 [4.00 - 5.00] | 0.90 | yes |" in md, md
