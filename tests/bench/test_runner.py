"""End-to-end runs of ``python -m benchmarks`` on tiny models, and the CLI's guards.

Only relations that must hold and could break are asserted: recompute ratio 1 reproduces
the full prefill (teacher-forced agreement 1, perplexity ratio 1, same answers); the prefix
cache reuses whole blocks, never past the common prefix; timed rounds are interleaved in
shuffled orders; per-round speedups are the ratios of the recorded per-round TTFTs.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.__main__ import config_from_args, load_sweep, main, parser
from benchmarks.runner import MIN_REPS, round_orders

METHODS = ["full", "prefix", "semshare", "semshare_r0", "semshare_r1", "semshare_pruned"]
SWEEP = {"r0.1": {"recompute_ratio": 0.1}, "r0.2-decay": {"recompute_ratio": 0.2, "recompute_decay": 0.9}}
REPS = 2
FIELDS = {"pair", "length", "source", "doc_id", "edit", "ratio", "method", "kind", "group", "overrides", "n_tokens",
          "ref_tokens", "ttft_ms", "ttft_min_ms", "ttft_max_ms", "ttft_iqr_ms", "ttft_ms_rounds", "round_positions",
          "speedup", "speedup_min", "speedup_max", "speedup_rounds", "fetch_ms", "mapping_ms", "gather_ms",
          "prefill_ms", "flop_proxy", "probe_rows", "rows_per_layer", "kv_bytes", "ref_kv_bytes", "reused_tokens",
          "reused_share", "hit", "first_token", "first_token_agree", "agreement", "target_argmax", "nll", "ppl",
          "ppl_ratio", "similarity", "retention", "recompute_ratio", "warmup_ms"}
FACT_FIELDS = {"answer_ids", "answer_text", "answer_correct", "answer_stale", "answer_same_as_full", "fact"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    sweep = out / "sweep.yaml"
    sweep.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in SWEEP.items()))
    rc = main(["--model", "tiny-random", "--device", "cpu", "--lengths", "64,128", "--edits", "replace,instruction",
               "--ratios", "0.3", "--pairs", "1", "--fact-pairs", "1", "--new-tokens", "4", "--answer-tokens", "6",
               "--reps", str(REPS), "--methods", ",".join(METHODS), "--sweep", str(sweep),
               "--memory-retentions", "1.0,0.5,0.3", "--memory-length", "128", "--name", "tiny",
               "--base-config", '{"recompute_min_tokens": 0}',  # 64-128-token prompts
               "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "tiny.json").read_text())


def _by(result, method):
    return {r["pair"]: r for r in result["records"] if r["method"] == method}


def test_files_written(tiny_run):
    out, result = tiny_run
    md = (out / "tiny.md").read_text()
    for section in ("## By prompt length", "## Fact edits", "## Sweep", "## Where the time goes", "## Quality by edit",
                    "## Decode KV memory vs retention"):
        assert section in md
    for m in METHODS + list(SWEEP):
        assert f"| {m} |" in md
    for kind in ("speedup", "quality", "memory"):
        png = out / f"tiny_{kind}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert result["machine"]["torch_threads"] == result["config"]["threads"] == 1
    assert result["config"]["lengths"] == [64, 128] and result["config"]["reps"] == REPS


def test_records_have_fields(tiny_run):
    _, result = tiny_run
    recs = result["records"]
    pairs = {r["pair"] for r in recs}
    assert len(pairs) == 2 * 3  # 2 lengths x (replace + instruction + 1 fact pair)
    per_pair = len(METHODS) + len(SWEEP)
    assert len(recs) == len(pairs) * per_pair + 3 * 1  # semshare_ret0.3 only on the 3 pairs of length 128
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        if r["source"] == "facts":
            assert FACT_FIELDS <= set(r), FACT_FIELDS - set(r)
        assert len(r["ttft_ms_rounds"]) == len(r["speedup_rounds"]) == len(r["round_positions"]) == REPS
        assert r["ttft_min_ms"] <= r["ttft_ms"] <= r["ttft_max_ms"]
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert 0 < r["flop_proxy"] <= 1.0 + 1e-9
        assert 0 <= r["reused_tokens"] < r["n_tokens"]
        assert len(r["target_argmax"]) == 4 and 0.0 <= r["agreement"] <= 1.0
    assert {r["method"] for r in recs if r["group"] == "sweep"} == set(SWEEP)
    assert {r["length"] for r in recs if r["method"] == "semshare_ret0.3"} == {128}


def test_speedup_is_the_median_of_recorded_round_ratios(tiny_run):
    _, result = tiny_run
    for pair, full in _by(result, "full").items():
        for r in (x for x in result["records"] if x["pair"] == pair):
            ratios = [f / m for f, m in zip(full["ttft_ms_rounds"], r["ttft_ms_rounds"])]
            assert r["speedup_rounds"] == pytest.approx(ratios, rel=1e-3)  # rounds stored to 3 decimals
            s = sorted(ratios)
            assert r["speedup"] == pytest.approx((s[0] + s[1]) / 2 if len(s) == 2 else s[len(s) // 2], rel=1e-3)


def test_rounds_are_interleaved_and_shuffled(tiny_run):
    _, result = tiny_run
    for pair in {r["pair"] for r in result["records"]}:
        recs = [r for r in result["records"] if r["pair"] == pair]
        for rnd in range(REPS):  # every round runs every method once: positions are a permutation
            assert sorted(r["round_positions"][rnd] for r in recs) == list(range(len(recs)))
    # over the whole run the order changed between rounds (11 methods: same order twice has odds 1/11!)
    orders = {}
    for r in result["records"]:
        orders.setdefault(r["pair"], {})[r["method"]] = r["round_positions"]
    assert any(len({tuple(pos[i] for pos in per.values()) for i in range(REPS)}) > 1 for per in orders.values())


def test_round_orders_seeded_permutations():
    names = [f"m{i}" for i in range(8)]
    a = round_orders(names, 6, random.Random("7:3"))
    assert a == round_orders(names, 6, random.Random("7:3"))  # seeded
    assert all(sorted(o) == sorted(names) for o in a)
    assert len({tuple(o) for o in a}) > 1  # the order differs across rounds
    assert a != round_orders(names, 6, random.Random("7:4"))


def test_recompute_everything_equals_full(tiny_run):
    """recompute_ratio 1.0 recomputes every row: on float32 it is a full prefill."""
    _, result = tiny_run
    full = _by(result, "full")
    for pair, r in _by(result, "semshare_r1").items():
        assert r["hit"] and r["reused_tokens"] == 0
        assert r["agreement"] == 1.0 and r["first_token_agree"]
        assert r["target_argmax"] == full[pair]["target_argmax"]
        assert r["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
        if r["source"] == "facts":
            assert r["answer_same_as_full"] and r["answer_ids"] == full[pair]["answer_ids"]


def test_prefix_reuses_whole_blocks_of_the_common_prefix(tiny_run):
    _, result = tiny_run
    for pair, r in _by(result, "prefix").items():
        block = r["prefix_block"]
        assert r["reused_tokens"] % block == 0
        assert r["reused_tokens"] <= r["common_prefix"]
        assert r["hit"] == (r["reused_tokens"] >= block)
        assert r["common_prefix"] - r["reused_tokens"] < block or r["reused_tokens"] == (r["n_tokens"] - 1) // block * block
        assert r["flop_proxy"] == pytest.approx(1 - r["reused_tokens"] / r["n_tokens"])
        assert r["agreement"] == 1.0 and r["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    # the instruction edit changes the first tokens: nothing to reuse, a plain full prefill
    for r in _by(result, "prefix").values():
        if r["edit"] == "instruction":
            assert not r["hit"] and r["reused_tokens"] == 0


def test_compute_and_memory_order(tiny_run):
    _, result = tiny_run
    full, r0, ss, pr = (_by(result, m) for m in ("full", "semshare_r0", "semshare", "semshare_pruned"))
    for key in full:
        assert r0[key]["flop_proxy"] <= ss[key]["flop_proxy"] <= 1.0
        assert ss[key]["kv_bytes"] == full[key]["kv_bytes"]       # retention 1.0: nothing pruned
        if pr[key]["hit"]:
            assert pr[key]["kv_bytes"] < ss[key]["kv_bytes"]       # retention 0.5 prunes
        else:  # planned to cost as much as a full prefill: the engine ran that instead
            assert pr[key]["flop_proxy"] == 1.0 and pr[key]["kv_bytes"] == full[key]["kv_bytes"]
        assert ss[key]["rows_per_layer"][0] == ss[key]["n_tokens"]  # layer 0 always runs on every token
    assert sum(pr[key]["hit"] for key in full) >= len(full) // 2


def test_reps_minimum_and_presets():
    bc = config_from_args(parser().parse_args([]))
    assert bc.reps == MIN_REPS and bc.lengths == [1024, 2048] and bc.kv_placement == "host"
    assert bc.budget_s is not None and bc.budget_s <= 25 * 60
    assert config_from_args(parser().parse_args(["--reps", "2"])).reps == 2  # explicit: taken as is
    bc = config_from_args(parser().parse_args(["--quick"]))
    assert bc.reps >= MIN_REPS and len(bc.lengths) == 1 and bc.fact_pairs >= 1
    bc = config_from_args(parser().parse_args(["--quick", "--lengths", "512", "--budget-s", "60"]))
    assert bc.lengths == [512] and bc.budget_s == 60
    assert config_from_args(parser().parse_args(["--budget-s", "0"])).budget_s is None
    bc = config_from_args(parser().parse_args(["--methods", "semshare"]))
    assert bc.methods[0] == "full"  # the baseline is always run


@pytest.mark.parametrize("spec, needle", [
    ('{"bad": {"no_such_field": 1}}', "no_such_field"),
    ('{"neg": {"recompute_ratio": -0.5}}', "recompute_ratio"),
    ('{"semshare": {"recompute_ratio": 0.1}}', "built-in"),
    ("[1, 2]", "mapping"),
])
def test_bad_sweep_fails_before_the_model_loads(spec, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny-random", "--sweep", spec, "--no-progress", "--out-dir", "/nonexistent"])
    assert needle in str(e.value)


def test_sweep_file_and_inline(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(SWEEP))
    assert load_sweep(str(f)) == SWEEP
    assert load_sweep(json.dumps(SWEEP)) == SWEEP
    committed = Path(__file__).resolve().parents[2] / "benchmarks" / "sweeps" / "schedule.yaml"
    bc = config_from_args(parser().parse_args(["--sweep", str(committed)]))
    assert len(bc.sweep) >= 3 and all(isinstance(v, dict) for v in bc.sweep.values())


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


@pytest.mark.parametrize("placement", ["device", "bytes"])
def test_gpu_path_small_shape_without_faiss(tmp_path, placement):
    """The llama3-8b-random path (small dims, CPU) with faiss/ray/fastapi unimportable."""
    args = ["--model", "llama3-8b-random", "--model-shape", "small", "--dtype", "float32", "--device", "cpu",
            "--lengths", "96", "--threads", "1", "--edits", "replace", "--ratios", "0.3", "--fact-pairs", "0",
            "--new-tokens", "2", "--reps", "1", "--methods", "full,prefix,semshare,semshare_r1",
            "--kv-placement", placement, "--jsonl", "--no-progress", "--no-plots", "--name", "g",
            "--out-dir", str(tmp_path)]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", BLOCK, *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert lines[0]["event"] == "setup" and lines[-1]["event"] == "done"
    result = json.loads((tmp_path / "g.json").read_text())
    recs = {r["method"]: r for r in result["records"]}
    assert set(recs) == {"full", "prefix", "semshare", "semshare_r1"}
    assert result["model"]["layers"] == 4 and all(r["placement"] == placement for r in recs.values())
    assert recs["semshare_r1"]["target_argmax"] == recs["full"]["target_argmax"]
    if placement == "bytes":  # the blob is parsed on every reuse
        assert recs["semshare"]["fetch_ms"] > 0


def test_replot_from_json(tiny_run, tmp_path):
    out, result = tiny_run
    assert main(["--replot", str(out / "tiny.json"), "--out-dir", str(tmp_path), "--name", "again"]) == 0
    assert (tmp_path / "again.md").read_text() == (out / "tiny.md").read_text()
    assert (tmp_path / "again_memory.png").read_bytes()[:8] == PNG
