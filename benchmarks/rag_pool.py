"""Pool several ``benchmarks.rag`` result files (other seeds = other held-out prompt sets).

    python -m benchmarks.rag_pool --out rag-pooled-NAME rag-a rag-b rag-c

One file's medians move by a token of agreement or a prompt of first-token agreement
from one prompt set to the next (the metric's floor, the same full prefill in chunks,
moves as much), so the issue targets are read on the pooled prompts as well. Per file
and pooled: the ``benchmarks.rag`` summary row of each method on the target group
(~2k tokens, 3-4 sources); speedups pool only the files that ran timed rounds.
Writes ``benchmarks/results/<out>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .rag import HEADER, _row, summarize

RESULTS = Path(__file__).resolve().parent / "results"


def target(r: dict) -> bool:
    return r["length"] >= 1536 and r["sources"] >= 3


def load(name: str) -> dict:
    path = Path(name)
    if not path.suffix:
        path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())


def pooled_summary(files: dict[str, dict], method: str) -> dict | None:
    """``benchmarks.rag.summarize`` of ``method`` over every set's target prompts (None: none)."""
    recs = [r for res in files.values() for r in res["records"] if r["method"] == method and target(r)]
    return summarize(recs) if recs else None


MARGIN_BUCKETS = (("exact tie (0)", lambda m: m == 0.0), ("within 0.25", lambda m: 0.0 < m <= 0.25),
                  ("over 0.25", lambda m: m > 0.25))


def first_by_margin(files: dict[str, dict], method: str) -> list[tuple[str, int, int, int | None]]:
    """First-token agreement of ``method`` on the pooled target prompts, split by the full
    prefill's top-2 margin of its first logits (``full_first_margin``; bf16 logits of ~30
    are 0.125 apart): ``(bucket, prompts, agree (served bf16 head), agree (float32 head),
    None where a file has no float32 reading: a compiled full prefill)``.
    Empty when the files predate the margin."""
    recs = [r for res in files.values() for r in res["records"] if r["method"] == method and target(r)]
    if not recs or any(r.get("full_first_margin") is None for r in recs):
        return []
    rows = []
    for label, pred in MARGIN_BUCKETS:
        g = [r for r in recs if pred(r["full_first_margin"])]
        rows.append((label, len(g), sum(bool(r["first_token_agree"]) for r in g),
                     sum(bool(r["first_token_agree_fp32"]) for r in g)
                     if all("first_token_agree_fp32" in r for r in g) else None))
    return rows


def report(files: dict[str, dict], pooled: dict[str, dict | None], out: str) -> str:
    """The markdown report; ``pooled``: :func:`pooled_summary` per method (in report order)."""
    methods = list(pooled)
    lines = [f"# RAG-shaped prompts, pooled over {len(files)} prompt sets (`{out}`)", "",
             "Each set is one `benchmarks.rag` run (its own seed: other passages, cached prompts and new prompts); "
             "rows: the target group (~2k tokens, 3-4 sources), per set and pooled. Teacher-forced tokens per "
             "set: " + ", ".join(f"`{n}` {res['config'].get('new_tokens', 32)} (seed {res['config']['seed']}, "
                                 f"{res['config']['reps']} timed rounds)" for n, res in files.items()) + ".", "",
             "## Per set and pooled", "", HEADER]
    for name, res in files.items():
        for m in methods:
            g = [r for r in res["records"] if r["method"] == m and target(r)]
            if g:
                lines.append(_row(f"{name} | {m}", summarize(g)))
    for m, s in pooled.items():
        if s is not None:
            lines.append(_row(f"**pooled** | {m}", s))
    s = pooled.get("multi")
    if s is None:
        return "\n".join(lines + ["", "No several-source (multi) prompts in the target group."]) + "\n"
    split = {m: first_by_margin(files, m) for m in methods}
    if any(split.values()):
        lines += ["", "## First token by how decided the full prefill's first token is", "",
                  "The full prefill's top-2 margin of its first logits (the served bf16 head: logits of ~30 are "
                  "0.125 apart, so near-ties are common); agreement with the full prefill's first token through "
                  "the served bf16 head / a float32 head over the same hidden state.", "",
                  "| method | margin | prompts | first token (bf16 head) | first token (float32 head) |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for m, rows in split.items():
            for label, n, agree, agree32 in rows:
                if n:
                    fp32 = "n/a" if agree32 is None else f"{agree32}/{n}"
                    lines.append(f"| {m} | {label} | {n} | {agree}/{n} | {fp32} |")
    checks = [("tokens mapped to a source >= 0.8", s["mapped"], s["mapped"] >= 0.8),
              ("rows reused at layer 1 (for reference)", s["reused"], None),
              ("median speedup >= 2.5x (timed sets only)", s["speedup"],
               s["speedup"] is not None and s["speedup"] >= 2.5),
              ("agreement median >= 0.95", s["agreement"], s["agreement"] >= 0.95),
              ("agreement p10 >= 0.90", s["agreement_p10"], s["agreement_p10"] >= 0.90),
              ("first token >= 90%", s["first"], s["first"] >= 0.90),
              ("first token >= 90% (float32 head over the same hidden states)", s.get("first_fp32"),
               None if s.get("first_fp32") is None else s["first_fp32"] >= 0.90),
              ("ppl ratio median <= 1.02", s["ppl"], s["ppl"] <= 1.02)]
    lines += ["", f"## Issue targets on the pooled {s['prompts']} prompts (multi, default config)", "",
              "| target | measured | holds |", "| --- | ---: | --- |"]
    for label, v, ok in checks:
        val = "-" if v is None else f"{v:.3f}"
        lines.append(f"| {label} | {val} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rag_pool", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="result names in benchmarks/results (or paths to .json files)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    files = {Path(f).stem: load(f) for f in a.files}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = dict.fromkeys(r["method"] for res in files.values() for r in res["records"])
    pooled = {m: pooled_summary(files, m) for m in methods}
    (out / f"{a.out}.json").write_text(json.dumps({"files": list(files), "pooled": pooled}, indent=1, default=str))
    (out / f"{a.out}.md").write_text(report(files, pooled, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
