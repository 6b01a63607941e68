"""The serving load benchmark's workload and summaries (the HTTP path is exercised by tests/integration/test_load.py)."""
from __future__ import annotations

from benchmarks.load import build_workload, markdown, pct, summarize


def _count(s: str) -> int:
    return len(s.split())


def test_workload_is_deterministic_and_ordered():
    a = build_workload(3, 300, 2, 3, 2, 0, _count)
    b = build_workload(3, 300, 2, 3, 2, 0, _count)
    assert a == b
    assert [w["kind"] for w in a[:3]] == ["first"] * 3
    kinds = [w["kind"] for w in a]
    assert kinds.count("repeat") == 6 and kinds.count("similar") == 9 and kinds.count("unrelated") == 2
    firsts = {w["prompt"] for w in a[:3]}
    assert all(w["prompt"] in firsts for w in a if w["kind"] == "repeat")
    assert not any(w["prompt"] in firsts for w in a if w["kind"] == "unrelated")
    assert build_workload(3, 300, 2, 3, 2, 1, _count) != a


def test_percentiles_and_summary():
    assert pct([], 50) is None and pct([5.0], 99) == 5.0
    assert pct(list(map(float, range(1, 101))), 50) in (50.0, 51.0) and pct(list(map(float, range(1, 101))), 99) == 99.0
    recs = [{"i": 0, "kind": "first", "status": 200, "latency_ms": 10.0, "ttft_ms": 5.0, "cache_hit": False,
             "prompt_tokens": 100, "reused_tokens": 0},
            {"i": 1, "kind": "repeat", "status": 200, "latency_ms": 6.0, "ttft_ms": 2.0, "cache_hit": True,
             "prompt_tokens": 100, "reused_tokens": 90},
            {"i": 2, "kind": "repeat", "status": 503, "latency_ms": 1.0}]
    s = summarize(recs, 2.0)
    assert s["ok"] == 2 and s["non_200"] == 1 and s["hit_rate"] == 0.5 and s["reused_share"] == 0.45
    assert s["by_kind"]["repeat"]["hit_rate"] == 1.0 and s["requests_per_s"] == 1.0
    md = markdown({"name": "x", "server": "s", "machine": "m", "modes": {"reuse_on": s},
                   "config": {"concurrency": 2, "requests": 3, "docs": 1, "length": 10, "repeats": 1,
                              "variants": 0, "unrelated": 0, "new_tokens": 1}})
    assert "| reuse_on | 2 / 3 |" in md


def test_hit_tiers_and_combined_table(tmp_path):
    import json

    from benchmarks.load import combine, derived_config

    recs = [{"i": i, "kind": "similar", "status": 200, "latency_ms": 9.0, "ttft_ms": float(t), "cache_hit": tier is not None,
             "prompt_tokens": 10, "reused_tokens": 5 if tier else 0, "replica": f"r{i % 2}", "cache_tier": tier}
            for i, (t, tier) in enumerate([(10, "hot"), (20, "hot"), (30, "cold"), (40, None), (50, "hot")])]
    s = summarize(recs, 1.0)
    assert s["hits"] == 4 and s["hot_hits"] == 3 and s["hot_hit_share"] == 0.75
    assert s["hit_ttft_min_ms"] == 10.0 and s["hit_ttft_max_ms"] == 50.0 and s["cold_hit_ttft_p50_ms"] == 30.0
    assert s["replicas_seen"] == 2
    res = {"name": "r2-on", "config": {"replicas": 2, "affinity": "on"}, "modes": {"reuse_on": s}}
    (tmp_path / "a.json").write_text(json.dumps(res))
    table = combine([str(tmp_path / "a.json")])
    assert "| r2-on | 2 | on | 5 / 5 | 0.80 | 0.75 |" in table
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http_options: {port: 8000}\napplications:\n  - name: x\n    args: {preset: smollm2-135m}\n")
    import yaml

    doc = yaml.safe_load(open(derived_config(str(cfg), tmp_path, 2, 0.9, "off", 8123)))
    assert doc["http_options"]["port"] == 8123
    assert doc["applications"][0]["args"] == {"preset": "smollm2-135m", "num_replicas": 2, "num_cpus": 0.9,
                                              "affinity": False}
