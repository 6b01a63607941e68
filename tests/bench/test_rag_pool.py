"""Pooling ``benchmarks.rag`` result files: the pooled row counts every prompt of every
set once, the targets are read on the pooled prompts, and speedups come only from sets
that ran timed rounds."""
from __future__ import annotations

import json

from benchmarks import rag_pool


def _rec(method: str, agreement: float, first: bool, ppl: float, length: int = 2048, sources: int = 3,
         speedup: float | None = None) -> dict:
    r = {"method": method, "length": length, "sources": sources, "kind": "rag", "n_tokens": length, "hit": True,
         "reused_share": 0.6, "mapped_share": 0.99, "reused_mean": 0.77, "flop_proxy": 0.3,
         "agreement": agreement, "first_token_agree": first, "ppl_ratio": ppl}
    if speedup is not None:
        r.update(speedup=speedup, speedup_rounds=[speedup], speedup_cpu=speedup, speedup_cpu_rounds=[speedup])
    return r


def _res(seed: int, reps: int, recs: list[dict]) -> dict:
    return {"config": {"seed": seed, "reps": reps, "new_tokens": 64}, "records": recs}


def test_pooled_targets_count_every_prompt_and_only_timed_speedups(tmp_path):
    a = _res(0, 0, [_rec("multi", 1.0, True, 1.0), _rec("multi", 0.9, False, 1.05),
                    _rec("multi", 0.5, False, 2.0, length=1024)])  # 1k: outside the target group
    b = _res(1, 5, [_rec("multi", 0.97, True, 1.01, speedup=3.0), _rec("multi", 0.95, True, 1.0, speedup=2.0)])
    for name, res in (("set-a", a), ("set-b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    assert rag_pool.main([str(tmp_path / "set-a.json"), str(tmp_path / "set-b.json"), "--out", "pooled",
                          "--out-dir", str(tmp_path)]) == 0
    pooled = json.loads((tmp_path / "pooled.json").read_text())["pooled"]["multi"]
    assert pooled["prompts"] == 4
    assert pooled["first"] == 0.75                        # 3 of the 4 target prompts
    assert pooled["agreement"] == (0.95 + 0.97) / 2        # median of 1.0, 0.9, 0.97, 0.95
    assert pooled["speedup"] == 2.5                       # the timed set only
    md = (tmp_path / "pooled.md").read_text()
    assert "| first token >= 90% | 0.750 | NO |" in md
    assert "| median speedup >= 2.5x (timed sets only) | 2.500 | yes |" in md


def test_first_token_is_split_by_the_full_prefills_margin():
    """Near-ties apart: an exact tie, a margin within 0.25 and a clear one; the float32
    head's reading beside the served one; files without margins give no split."""
    recs = []
    for margin, first, first32 in ((0.0, False, True), (0.125, True, True), (0.125, False, False), (1.5, True, True)):
        r = _rec("multi", 1.0, first, 1.0)
        r.update(full_first_margin=margin, first_token_agree_fp32=first32)
        recs.append(r)
    recs.append({**_rec("multi", 1.0, False, 1.0, length=1024), "full_first_margin": 2.0,
                 "first_token_agree_fp32": False})  # outside the target group
    rows = rag_pool.first_by_margin({"a": _res(0, 0, recs)}, "multi")
    assert rows == [("exact tie (0)", 1, 0, 1), ("within 0.25", 2, 1, 1), ("over 0.25", 1, 1, 1)]
    assert rag_pool.first_by_margin({"a": _res(0, 0, [_rec("multi", 1.0, True, 1.0)])}, "multi") == []
    for r in recs[:2]:  # a compiled full prefill gives no float32 reading: n/a, not 0 agreements
        del r["first_token_agree_fp32"]
    rows = rag_pool.first_by_margin({"a": _res(0, 0, recs)}, "multi")
    assert rows == [("exact tie (0)", 1, 0, None), ("within 0.25", 2, 1, None), ("over 0.25", 1, 1, 1)]
