"""The environment A/B benchmark on a tiny model: two workers, the setting reaches only the 'on'
one, rounds alternate, the report's ratios come from the rounds."""
from __future__ import annotations

import json

from benchmarks.env_ab import main


def test_env_ab_runs_two_workers_in_alternating_rounds(tmp_path):
    assert main(["--env", "SEMSHARE_AB_PROBE=1", "--model", "tiny", "--compile", "off", "--workload", "decode",
                 "--clients", "2", "--rounds", "2", "--per-client", "1", "--prompt-tokens", "20", "--new-tokens", "4",
                 "--name", "t", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["worker_env"] == {"on": {"SEMSHARE_AB_PROBE": "1"}, "off": {"SEMSHARE_AB_PROBE": None}}
    assert [r["first"] for r in res["rounds_data"]] == ["on", "off"]
    ratios = [r["on"]["tokens_per_s"] / r["off"]["tokens_per_s"] for r in res["rounds_data"]]
    assert res["summary"]["ratio"]["min"] == round(min(ratios), 3)
    assert all(r[arm]["output_tokens"] == 8 for r in res["rounds_data"] for arm in ("on", "off"))
    assert "on / off per round" in (tmp_path / "t.md").read_text()
