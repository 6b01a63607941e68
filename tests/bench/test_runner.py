"""End-to-end runs of ``python -m benchmarks`` on tiny models: files written, records sane.

Only relations that must hold are asserted (no measured numbers): full prefill is its
own baseline; recompute ratio 1 reproduces the full prefill; prefix reuse is exact;
the KV held for decode is the prompt's KV unless pruned.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.__main__ import config_from_args, main, parser

METHODS = ["full", "prefix", "semshare_r0", "semshare", "semshare_pruned", "semshare_r1"]
FIELDS = {"length", "doc_id", "edit", "ratio", "method", "n_tokens", "ref_tokens", "ttft_ms", "ttft_ms_reps", "speedup",
          "fetch_ms", "mapping_ms", "gather_ms", "prefill_ms", "flop_proxy", "rows_per_layer", "kv_bytes",
          "ref_kv_bytes", "reused_tokens", "reused_share", "first_token", "first_token_agree", "rouge_l",
          "rouge_l_tokens", "ppl", "ppl_ratio", "tokens", "text", "similarity", "retention", "recompute_ratio"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--model", "tiny-random", "--device", "cpu", "--lengths", "64,128", "--edits", "replace,instruction",
               "--ratios", "0.3", "--pairs", "1", "--new-tokens", "3", "--reps", "1", "--methods", ",".join(METHODS),
               "--memory-retentions", "1.0,0.5", "--memory-length", "128", "--name", "tiny", "--out-dir", str(out),
               "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "tiny.json").read_text())


def _by(result, method):
    return {(r["length"], r["edit"], r["ratio"]): r for r in result["records"] if r["method"] == method}


def test_files_written(tiny_run):
    out, result = tiny_run
    md = (out / "tiny.md").read_text()
    assert "## By prompt length" in md and "## Quality by edit" in md and "retention" in md
    for m in METHODS:
        assert f"| {m} |" in md
    for kind in ("speedup", "quality", "memory"):
        png = out / f"tiny_{kind}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert result["machine"]["torch"] and result["machine"]["transformers"]
    assert result["config"]["lengths"] == [64, 128]


def test_records_have_fields(tiny_run):
    _, result = tiny_run
    recs = result["records"]
    assert len(recs) == 2 * 2 * len(METHODS)  # 2 lengths x 2 pairs x methods
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["ttft_ms"] > 0 and r["speedup"] > 0
        assert 0 < r["flop_proxy"] <= 1.0 + 1e-9
        assert 0 <= r["reused_tokens"] < r["n_tokens"]
        assert 0.0 <= r["rouge_l"] <= 1.0 and r["ppl"] >= 1.0
        assert len(r["tokens"]) == 3
        assert min(r["fetch_ms"], r["mapping_ms"], r["gather_ms"], r["prefill_ms"]) >= 0


def test_full_is_the_baseline(tiny_run):
    _, result = tiny_run
    for r in _by(result, "full").values():
        assert r["speedup"] == 1.0 and r["flop_proxy"] == 1.0 and r["reused_tokens"] == 0
        assert r["rouge_l"] == 1.0 and r["ppl_ratio"] == 1.0 and r["first_token_agree"]


def test_recompute_everything_equals_full(tiny_run):
    _, result = tiny_run
    full = _by(result, "full")
    for key, r in _by(result, "semshare_r1").items():
        assert r["flop_proxy"] == 1.0 and r["reused_tokens"] == 0
        assert r["tokens"] == full[key]["tokens"] and r["rouge_l"] == 1.0 and r["first_token_agree"]
        assert r["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)


def test_prefix_reuse_is_exact_and_bounded(tiny_run):
    _, result = tiny_run
    full, r0 = _by(result, "full"), _by(result, "semshare_r0")
    window = result["config"]["semshare_config"]["window"]
    for key, r in _by(result, "prefix").items():
        # every prefix token exists in the reference, so SemShare maps it; only its last window is forced
        assert r["reused_tokens"] <= r0[key]["reused_tokens"] + window
        assert r["flop_proxy"] == pytest.approx(1 - r["reused_tokens"] / r["n_tokens"])
        assert r["tokens"] == full[key]["tokens"] and r["first_token_agree"]
        assert r["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert r["kv_bytes"] == full[key]["kv_bytes"]
    # the instruction edit changes the first tokens: prefix caching reuses (almost) nothing
    for (length, edit, _), r in _by(result, "prefix").items():
        if edit == "instruction":
            assert r["reused_share"] < 0.1


def test_compute_and_memory_order(tiny_run):
    _, result = tiny_run
    full, r0, ss, pr = (_by(result, m) for m in ("full", "semshare_r0", "semshare", "semshare_pruned"))
    for key in full:
        assert r0[key]["flop_proxy"] <= ss[key]["flop_proxy"] <= 1.0
        assert r0[key]["reused_tokens"] >= ss[key]["reused_tokens"]
        assert ss[key]["kv_bytes"] == full[key]["kv_bytes"]       # retention 1.0: nothing pruned
        assert pr[key]["kv_bytes"] <= ss[key]["kv_bytes"]
        assert ss[key]["rows_per_layer"][0] == ss[key]["n_tokens"]  # layer 0 always runs on every token


def test_quick_preset_fits_budget():
    bc = config_from_args(parser().parse_args(["--model", "llama3-8b-random", "--quick", "--name", "q"]))
    assert max(bc.lengths) == 16384 and bc.budget_s is not None and bc.budget_s <= 480
    bc = config_from_args(parser().parse_args(["--quick", "--lengths", "1024", "--budget-s", "60"]))
    assert bc.lengths == [1024] and bc.budget_s == 60


BLOCK = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"faiss", "ray", "fastapi"}:
                raise ImportError("blocked for the GPU-image check: " + name)
    sys.meta_path.insert(0, Block())
    from benchmarks.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("placement", ["device", "host"])
def test_gpu_path_small_shape_without_faiss(tmp_path, placement):
    """The llama3-8b-random path (small dims, CPU) with faiss/ray/fastapi unimportable."""
    args = ["--model", "llama3-8b-random", "--model-shape", "small", "--dtype", "float32", "--device", "cpu",
            "--lengths", "96", "--threads", "1", "--edits", "replace", "--ratios", "0.3", "--new-tokens", "2", "--reps", "1",
            "--methods", "full,prefix,semshare,semshare_r1", "--memory-retentions", "1.0", "--kv-placement", placement,
            "--jsonl", "--no-progress", "--no-plots", "--name", "g", "--out-dir", str(tmp_path)]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", BLOCK, *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert lines[0]["event"] == "setup" and lines[-1]["event"] == "done"
    result = json.loads((tmp_path / "g.json").read_text())
    recs = {r["method"]: r for r in result["records"]}
    assert set(recs) == {"full", "prefix", "semshare", "semshare_r1"}
    assert result["model"]["layers"] == 4 and all(r["placement"] == placement for r in recs.values())
    assert recs["semshare_r1"]["tokens"] == recs["full"]["tokens"]
    assert recs["semshare"]["fetch_ms"] == 0.0  # host / device placement: nothing to parse


def test_replot_from_json(tiny_run, tmp_path):
    out, result = tiny_run
    assert main(["--replot", str(out / "tiny.json"), "--out-dir", str(tmp_path), "--name", "again"]) == 0
    assert (tmp_path / "again.md").read_text() == (out / "tiny.md").read_text()
    assert (tmp_path / "again_memory.png").read_bytes()[:8] == PNG
