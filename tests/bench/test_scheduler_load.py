"""The in-process scheduler benchmark on a tiny model: it runs every request, batches
concurrent clients, and writes its table."""
from __future__ import annotations

import json

from benchmarks import scheduler_load


def test_levels_run_every_request_and_batch_concurrent_clients(tmp_path):
    rc = scheduler_load.main(["--model", "tiny", "--clients", "1", "4", "--per-client", "2", "--prompt-tokens", "24",
                              "--new-tokens", "6", "--rounds", "1", "--name", "t", "--out-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    by = {r["clients"]: r for r in res["runs"]}
    assert by[1]["requests"] == 2 and by[4]["requests"] == 8
    assert by[1]["output_tokens"] == 2 * 6 and by[4]["output_tokens"] == 8 * 6   # EOS ignored: every token
    assert by[1]["mean_decode_batch"] == 1.0
    assert by[4]["mean_decode_batch"] > 1.0                                      # concurrent clients share steps
    md = (tmp_path / "t.md").read_text()
    assert "\n| 1 |" in md and "\n| 4 |" in md


def test_summary_medians_over_rounds():
    runs = [{"clients": 8, "tokens_per_s": x, "mean_decode_batch": 7.0, "mean_step_ms": 60.0} for x in (70, 75, 60)]
    s = scheduler_load.summarize(runs)[8]
    assert s["tokens_per_s"] == {"median": 70, "min": 60, "max": 75, "n": 3}


def test_reuse_level_runs_references_then_hits_and_replays(tmp_path):
    rc = scheduler_load.main(["--model", "tiny", "--workload", "reuse", "--clients", "4", "--length", "300",
                              "--reuse-new-tokens", "5", "--rounds", "1", "--name", "r", "--out-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    (run,) = res["runs"]
    assert run["requests"] == run["ok"] and run["requests"] % 4 == 0           # families x (reference + 2 + 1)
    assert run["output_tokens"] == 5 * run["requests"]                          # EOS ignored: every token
    assert run["references_s"] > 0 and run["references_s"] < run["wall_s"]      # references complete first
    assert all(run["ttft_ms"][k] is not None for k in ("reference", "variant", "repeat"))
    fams = run["requests"] // 4
    assert run["hits"] == {"reference": 0, "variant": 2 * fams, "repeat": fams}  # every follow-up reuses its entry
    assert run["prefill_steps"] >= run["requests"] // 4 and run["decode_only_steps"] > 0
    md = (tmp_path / "r.md").read_text()
    assert "reuse workload" in md and "\n| 4 |" in md
