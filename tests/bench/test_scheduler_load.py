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
