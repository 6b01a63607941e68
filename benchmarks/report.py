"""Turn a result dict into ``<name>.json``, ``<name>.md`` and three PNG plots.

Record fields used (one record per method per pair; see ``runner.run_pair``):
``length, source, edit, ratio, method, kind, group, overrides, n_tokens, ttft_ms, ttft_min_ms,
ttft_max_ms, ttft_iqr_ms, speedup, speedup_min, speedup_max, flop_proxy, kv_bytes, reused_share,
hit, fetch_ms, mapping_ms, gather_ms, prefill_ms, agreement, first_token_agree, ppl_ratio,
similarity, recompute_ratio, retention`` and on fact pairs ``answer_same_as_full,
answer_correct, answer_stale``.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .metrics import quantile

METHOD_ORDER = ("full", "prefix", "semshare", "semshare_r0", "semshare_r1", "semshare_pruned")
MARKERS = dict(zip(METHOD_ORDER, "osD^vP"))
# point 2 of issue 8: a schedule is acceptable when its quality stays within these
GATE = {"agreement_median": 0.95, "agreement_p10": 0.90, "first_token_agree": 0.9, "ppl_ratio_median": 1.02,
        "stale_points_over_full": 0.05}


def _vals(rs, key):
    return [float(r[key]) for r in rs if r.get(key) is not None]


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _q(xs, q):
    xs = [x for x in xs if x is not None]
    return quantile(xs, q) if xs else None


def _fmt(x, spec=".2f"):
    if x is None:
        return "–"
    return format(x, spec)


def _rank(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def _methods(records) -> list[str]:
    present = {r["method"] for r in records}
    ordered = [m for m in METHOD_ORDER if m in present]
    rest = [m for m in dict.fromkeys(r["method"] for r in records) if m not in ordered]  # run order
    return ordered + rest


def aggregate(rs: list[dict]) -> dict:
    """Summary of one method over a group of pairs."""
    return {
        "pairs": len(rs), "n_tokens": _med(_vals(rs, "n_tokens")),
        "ttft_ms": _med(_vals(rs, "ttft_ms")), "ttft_iqr_ms": _med(_vals(rs, "ttft_iqr_ms")),
        "speedup": _med(_vals(rs, "speedup")),
        "speedup_min": min(_vals(rs, "speedup_min"), default=None),
        "speedup_max": max(_vals(rs, "speedup_max"), default=None),
        "speedup_cpu": _med(_vals(rs, "speedup_cpu")),
        "speedup_cpu_min": min(_vals(rs, "speedup_cpu_min"), default=None),
        "speedup_cpu_max": max(_vals(rs, "speedup_cpu_max"), default=None),
        "flop_proxy": _med(_vals(rs, "flop_proxy")), "kv_mb": _med([x / 2**20 for x in _vals(rs, "kv_bytes")]),
        "reused_share": _med(_vals(rs, "reused_share")), "hit_rate": _mean(_vals(rs, "hit")),
        "agreement": _med(_vals(rs, "agreement")), "agreement_p10": _q(_vals(rs, "agreement"), 0.1),
        "first_token_agree": _mean(_vals(rs, "first_token_agree")),
        "ppl_ratio": _med(_vals(rs, "ppl_ratio")), "ppl_ratio_max": max(_vals(rs, "ppl_ratio"), default=None),
        "fetch_ms": _med(_vals(rs, "fetch_ms")), "mapping_ms": _med(_vals(rs, "mapping_ms")),
        "gather_ms": _med(_vals(rs, "gather_ms")), "prefill_ms": _med(_vals(rs, "prefill_ms")),
        "similarity": _med(_vals(rs, "similarity")),
    }


def summary_by_length(records, groups=("base", "sweep")) -> list[dict]:
    """Per (length, method): medians over pairs; speedup range = min/max of all per-round ratios."""
    by = defaultdict(list)
    for r in records:
        if r.get("group", "base") in groups:
            by[(r["length"], r["method"])].append(r)
    rows = []
    for length in sorted({k[0] for k in by}):
        for m in _methods([r for (l, _), rs in by.items() if l == length for r in rs]):
            rows.append({"length": length, "method": m, **aggregate(by[(length, m)])})
    return rows


def summary_by_edit(records) -> list[dict]:
    """Per (edit kind, ratio, method): quality and reuse, medians over lengths and documents."""
    by = defaultdict(list)
    for r in records:
        if r.get("group", "base") == "base":
            by[(r["edit"], r["ratio"], r["method"])].append(r)
    rows = []
    for (edit, ratio, m), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], _rank(kv[0][2]))):
        rows.append({"edit": edit, "ratio": ratio, "method": m, **aggregate(rs)})
    return rows


def fact_summary(records, groups=("base", "sweep")) -> list[dict]:
    """Per method over the fact pairs: same answer as full, correct, stale (rates), and full's own rates."""
    fr = [r for r in records if r.get("source") == "facts" and r.get("answer_correct") is not None
          and r.get("group", "base") in groups]
    full = [r for r in fr if r["method"] == "full"]
    full_correct, full_stale = _mean(_vals(full, "answer_correct")), _mean(_vals(full, "answer_stale"))
    rows = []
    for m in _methods(fr):
        rs = [r for r in fr if r["method"] == m]
        rows.append({"method": m, "pairs": len(rs), "same_as_full": _mean(_vals(rs, "answer_same_as_full")),
                     "correct": _mean(_vals(rs, "answer_correct")), "stale": _mean(_vals(rs, "answer_stale")),
                     "full_correct": full_correct, "full_stale": full_stale,
                     "speedup": _med(_vals(rs, "speedup")), "agreement": _med(_vals(rs, "agreement"))})
    return rows


def gate(agg: dict, fact_row: dict | None) -> tuple[bool | None, list[str]]:
    """Issue 8 point 2 thresholds on one method's pooled quality; ``(passed, failed checks)``."""
    checks = [("agreement median", agg.get("agreement"), lambda x: x >= GATE["agreement_median"]),
              ("agreement p10", agg.get("agreement_p10"), lambda x: x >= GATE["agreement_p10"]),
              ("first token", agg.get("first_token_agree"), lambda x: x >= GATE["first_token_agree"]),
              ("ppl median", agg.get("ppl_ratio"), lambda x: x <= GATE["ppl_ratio_median"])]
    if fact_row and fact_row.get("stale") is not None and fact_row.get("full_stale") is not None:
        checks.append(("stale", fact_row["stale"] - fact_row["full_stale"],
                       lambda x: x <= GATE["stale_points_over_full"] + 1e-12))
    if all(v is None for _, v, _ in checks):
        return None, []
    failed = [name for name, v, ok in checks if v is None or not ok(v)]
    return not failed, failed


def sweep_table(records) -> list[dict]:
    """Every semshare method (base and sweep) with its overrides: speed per length, pooled quality, gate."""
    ss = [r for r in records if r["kind"] == "semshare" and r.get("group", "base") in ("base", "sweep")]
    facts = {row["method"]: row for row in fact_summary(records)}
    lengths = sorted({r["length"] for r in ss})
    rows = []
    for m in _methods(ss):
        rs = [r for r in ss if r["method"] == m]
        agg = aggregate(rs)
        ok, failed = gate(agg, facts.get(m))
        rows.append({"method": m, "group": rs[0].get("group", "base"), "overrides": rs[0].get("overrides", {}),
                     "speedup_by_length": {l: _med(_vals([r for r in rs if r["length"] == l], "speedup"))
                                           for l in lengths},
                     "speedup_cpu_by_length": {l: _med(_vals([r for r in rs if r["length"] == l], "speedup_cpu"))
                                               for l in lengths},
                     **agg, "fact": facts.get(m), "gate": ok, "gate_failed": failed})
    return rows


def memory_sweep(records, length) -> list[dict]:
    """SemShare at several retentions (the default recompute) on one length."""
    base_ratio = None
    for r in records:
        if r["method"] == "semshare":
            base_ratio = r["recompute_ratio"]
            break
    rs = [r for r in records if r["length"] == length and r["kind"] == "semshare"
          and r.get("group", "base") in ("base", "memory") and r["recompute_ratio"] == base_ratio
          and r["method"] not in ("semshare_r0", "semshare_r1")]
    full = [r for r in records if r["length"] == length and r["method"] == "full"]
    rows = []
    if full:
        rows.append({"retention": "full prefill", "kv_mb": _med([x / 2**20 for x in _vals(full, "kv_bytes")]),
                     "agreement": _med(_vals(full, "agreement")), "ppl_ratio": _med(_vals(full, "ppl_ratio")),
                     "speedup": _med(_vals(full, "speedup")), "pairs": len(full)})
    for ret in sorted({r["retention"] for r in rs}, reverse=True):
        g = [r for r in rs if r["retention"] == ret]
        rows.append({"retention": ret, "kv_mb": _med([x / 2**20 for x in _vals(g, "kv_bytes")]),
                     "agreement": _med(_vals(g, "agreement")), "ppl_ratio": _med(_vals(g, "ppl_ratio")),
                     "speedup": _med(_vals(g, "speedup")), "pairs": len(g)})
    return rows


def _range(lo, hi, spec=".2f"):
    return "–" if lo is None or hi is None else f"{lo:{spec}}–{hi:{spec}}"


def _overrides(o: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in o.items()) or "(engine default)"


def markdown(result: dict) -> str:
    cfg, mach, recs = result["config"], result["machine"], result["records"]
    hw = mach.get("gpu") or f"{mach.get('cpu')} ({mach.get('cpu_count')} cores, {mach.get('torch_threads')} torch threads)"
    n_pairs = len({r["pair"] for r in recs}) if recs and "pair" in recs[0] else 0
    sc = cfg["semshare_config"]
    out = [f"# Benchmark `{cfg['name']}`", "",
           f"Model **{result['model_name']}** ({result['model']['layers']} layers, {result['model']['params'] / 1e6:.0f} M "
           f"params), {cfg['dtype']}, device `{cfg['device']}` on {hw}; torch {mach['torch']}, transformers "
           f"{mach['transformers']}. Reference KV placement `{cfg['kv_placement']}`; prefix cache blocks of "
           f"{cfg.get('prefix_block')} tokens. {n_pairs} pairs: prose edits {', '.join(cfg['edits'])} at ratios "
           f"{', '.join(map(str, cfg['ratios']))} ({cfg['pairs']} document(s) per length) and {cfg.get('fact_pairs', 0)} "
           f"fact-edit pair(s) per length. Engine default: recompute_ratio {sc.get('recompute_ratio')}, "
           f"retention {sc.get('retention')}. Wall time {result.get('elapsed_s', 0):.0f} s"
           + (f" (estimated <= {result['estimate_s']:.0f} s)" if result.get("estimate_s") else "")
           + (f"; {result['skipped_pairs']} pair(s) skipped by the time budget" if result.get("skipped_pairs") else "")
           + ".", "",
           f"**Timing**: per pair one warm-up run of every method, then {cfg['reps']} rounds running every method once "
           "in a seeded shuffled order. TTFT = median over rounds (IQR in the stage table); speedup = median over "
           "pairs of each pair's median per-round ratio full/method, [range] = min–max of all per-round ratios. "
           "CPU-time speedup: the same ratios of the timing thread's CPU time (one torch thread: the work done, "
           "whatever else runs on the box; on a quiet box it equals the wall-clock ratio). "
           "**Quality** (teacher-forced on the full prefill's "
           f"{cfg['new_tokens']} greedy tokens, from each method's own prefill): agreement = share of steps whose argmax "
           "is the target token (median and 10th percentile over pairs); first tok = share of pairs with the same first "
           "token; ppl ratio = exp((NLL_method - NLL_full)/k), median / max. FLOP proxy = (rows computed over all layers "
           "+ probe rows) / (n x layers). KV MB = decode cache after the prefill.", "",
           "## By prompt length", "",
           "| length | method | pairs | tokens | TTFT ms | speedup [range] | CPU-time speedup [range] | FLOP proxy | reused | hit | agreement med / p10 "
           "| first tok | ppl ratio med / max | KV MB |",
           "| ---: | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
    for r in summary_by_length(recs, groups=("base",)):
        out.append(f"| {r['length']} | {r['method']} | {r['pairs']} | {_fmt(r['n_tokens'], '.0f')} | "
                   f"{_fmt(r['ttft_ms'], '.1f')} | {_fmt(r['speedup'])}x [{_range(r['speedup_min'], r['speedup_max'])}] | "
                   f"{_fmt(r['speedup_cpu'])}x [{_range(r['speedup_cpu_min'], r['speedup_cpu_max'])}] | "
                   f"{_fmt(r['flop_proxy'])} | {_fmt(r['reused_share'], '.0%')} | {_fmt(r['hit_rate'], '.0%')} | "
                   f"{_fmt(r['agreement'])} / {_fmt(r['agreement_p10'])} | {_fmt(r['first_token_agree'], '.0%')} | "
                   f"{_fmt(r['ppl_ratio'], '.3f')} / {_fmt(r['ppl_ratio_max'], '.3f')} | {_fmt(r['kv_mb'], '.1f')} |")
    fr = fact_summary(recs, groups=("base",))
    if fr:
        out += ["", "## Fact edits (answers)", "",
                f"Greedy answer of up to {cfg.get('answer_tokens')} tokens to a question about a changed fact. "
                "same = token-exact equal to the full prefill's answer; correct = states the variant's (new) value; "
                "stale = states the reference's (old) value. Rates over the fact pairs of all lengths; full's own "
                "rates are its row.", "",
                "| method | pairs | same as full | correct | stale | stale - full's | speedup | agreement |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in fr:
            d = None if r["stale"] is None or r["full_stale"] is None else r["stale"] - r["full_stale"]
            out.append(f"| {r['method']} | {r['pairs']} | {_fmt(r['same_as_full'], '.0%')} | {_fmt(r['correct'], '.0%')} "
                       f"| {_fmt(r['stale'], '.0%')} | {_fmt(d, '+.0%')} | {_fmt(r['speedup'])}x | "
                       f"{_fmt(r['agreement'])} |")
    if any(r.get("group") == "sweep" for r in recs):
        sw = sweep_table(recs)
        lengths = sorted({l for row in sw for l in row["speedup_by_length"]})
        out += ["", "## Sweep (SemShare configurations)", "",
                "Quality pooled over all pairs and lengths. gate = issue 8 point 2: agreement median >= "
                f"{GATE['agreement_median']}, p10 >= {GATE['agreement_p10']}, first token >= "
                f"{GATE['first_token_agree']:.0%}, ppl ratio median <= {GATE['ppl_ratio_median']}, stale rate within "
                f"{GATE['stale_points_over_full']:.0%} of full's.", "",
                "| method | overrides | " + " | ".join(f"speedup {l} (CPU time)" for l in lengths)
                + " | FLOP proxy | agreement med / p10 | first tok | ppl med / max | fact same / stale | gate |",
                "| --- | --- | " + " | ".join("---:" for _ in lengths) + " | ---: | --- | ---: | --- | --- | --- |"]
        for r in sw:
            f = r["fact"] or {}
            g = "–" if r["gate"] is None else ("pass" if r["gate"] else "fail: " + ", ".join(r["gate_failed"]))
            out.append(f"| {r['method']} | {_overrides(r['overrides'])} | "
                       + " | ".join(f"{_fmt(r['speedup_by_length'][l])}x ({_fmt(r['speedup_cpu_by_length'].get(l))}x)"
                                    for l in lengths)
                       + f" | {_fmt(r['flop_proxy'])} | {_fmt(r['agreement'])} / {_fmt(r['agreement_p10'])} | "
                       f"{_fmt(r['first_token_agree'], '.0%')} | {_fmt(r['ppl_ratio'], '.3f')} / "
                       f"{_fmt(r['ppl_ratio_max'], '.3f')} | {_fmt(f.get('same_as_full'), '.0%')} / "
                       f"{_fmt(f.get('stale'), '.0%')} | {g} |")
    out += ["", "## Where the time goes (medians, ms)", "",
            "fetch = `PackedKV.from_bytes` of the stored blob (0 for host/device placement); mapping = token mapping; "
            "gather = gather + re-rotation (prefix: building the cache); prefill = the forward pass(es); "
            "TTFT IQR = median over pairs of the interquartile range over rounds.", "",
            "| length | method | TTFT | TTFT IQR | fetch | mapping | gather | prefill |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary_by_length(recs, groups=("base",)):
        out.append(f"| {r['length']} | {r['method']} | {_fmt(r['ttft_ms'], '.1f')} | {_fmt(r['ttft_iqr_ms'], '.1f')} | "
                   f"{_fmt(r['fetch_ms'], '.1f')} | {_fmt(r['mapping_ms'], '.1f')} | {_fmt(r['gather_ms'], '.1f')} | "
                   f"{_fmt(r['prefill_ms'], '.1f')} |")
    out += ["", "## Quality by edit (medians over lengths)", "",
            f"similarity = fingerprint cosine of variant and reference (the index admits >= {sc['sim_threshold']}).", "",
            "| edit | ratio | method | similarity | reused | speedup | agreement med / p10 | first tok | ppl ratio |",
            "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in summary_by_edit(recs):
        out.append(f"| {r['edit']} | {r['ratio']:g} | {r['method']} | {_fmt(r['similarity'])} | "
                   f"{_fmt(r['reused_share'], '.0%')} | {_fmt(r['speedup'])}x | {_fmt(r['agreement'])} / "
                   f"{_fmt(r['agreement_p10'])} | {_fmt(r['first_token_agree'], '.0%')} | {_fmt(r['ppl_ratio'], '.3f')} |")
    mem_len = cfg.get("memory_length")
    sweep = memory_sweep(recs, mem_len)
    if len(sweep) > 1:
        out += ["", f"## Decode KV memory vs retention (SemShare at the default recompute, length {mem_len})", "",
                "| retention | KV MB | agreement | ppl ratio | speedup | pairs |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sweep:
            ret = r["retention"] if isinstance(r["retention"], str) else f"{r['retention']:g}"
            out.append(f"| {ret} | {_fmt(r['kv_mb'], '.1f')} | {_fmt(r['agreement'])} | {_fmt(r['ppl_ratio'], '.3f')} | "
                       f"{_fmt(r['speedup'])}x | {r['pairs']} |")
    return "\n".join(out) + "\n"


def _finish(fig, ax, path: Path) -> Path:
    """Grid, tight layout, save as PNG, close; returns ``path``."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(result: dict, out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, cfg = result["records"], result["config"]
    title = f"{result['model_name']} ({cfg['device']}, {cfg['dtype']})"
    paths = []

    rows = summary_by_length(recs)
    lengths = sorted({r["length"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = _methods([r for r in recs if r.get("group", "base") in ("base", "sweep")])
    for i, m in enumerate(methods):
        pts = [r for r in rows if r["method"] == m and r["speedup"] is not None]
        if pts:
            off = 1 + (i - (len(methods) - 1) / 2) * 0.015  # small offsets so error bars stay visible
            xs = [r["length"] * off for r in pts]
            ys = [r["speedup"] for r in pts]
            err = [[y - (r["speedup_min"] or y) for y, r in zip(ys, pts)],
                   [(r["speedup_max"] or y) - y for y, r in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, marker=MARKERS.get(m, "x"), label=m, capsize=3,
                        linestyle="--" if m == "full" else "-", alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.set_xlabel("prompt length (tokens, nominal)")
    ax.set_ylabel("TTFT speedup vs full prefill\n(median of per-round ratios; bars: min–max)")
    ax.set_title(f"TTFT speedup — {title}")
    ax.legend(fontsize=8)
    paths.append(_finish(fig, ax, out_dir / f"{name}_speedup.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    qrecs = [r for r in recs if r.get("agreement") is not None and r.get("group", "base") in ("base", "sweep")]
    qmethods = _methods(qrecs)
    data = [[r["agreement"] for r in qrecs if r["method"] == m] for m in qmethods]
    if qmethods:
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(qmethods) + 1), qmethods, rotation=30, ha="right", fontsize=8)
        for i, m in enumerate(qmethods, start=1):
            ft = _mean([r.get("first_token_agree") for r in qrecs if r["method"] == m])
            if ft is not None:
                ax.annotate(f"1st {ft:.0%}", (i, 0.0), ha="center", fontsize=7, color="C3")
    ax.axhline(GATE["agreement_median"], color="gray", linestyle=":", linewidth=1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(f"teacher-forced top-1 agreement with full\n({cfg['new_tokens']} tokens, per pair)")
    ax.set_title(f"Quality over all pairs — {title}")
    paths.append(_finish(fig, ax, out_dir / f"{name}_quality.png"))

    sweep = memory_sweep(recs, cfg.get("memory_length"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in sweep if not isinstance(r["retention"], str)]
    if pts:
        ax.plot([r["retention"] for r in pts], [r["kv_mb"] for r in pts], marker="o", color="C0", label="SemShare KV MB")
        full = [r for r in sweep if isinstance(r["retention"], str)]
        if full:
            ax.axhline(full[0]["kv_mb"], color="gray", linestyle="--", label="full prefill KV MB")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        q = [(r["retention"], r["agreement"]) for r in pts if r["agreement"] is not None]
        if q:
            ax2.plot(*zip(*q), marker="s", color="C3", label="agreement (right)")
        ax2.set_ylim(-0.02, 1.05)
        ax2.set_ylabel("teacher-forced agreement with full")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right")
    ax.set_xlabel("retention (share of prompt tokens kept at the deepest layer)")
    ax.set_ylabel("decode KV cache (MB)")
    ax.set_title(f"KV memory vs retention, {cfg.get('memory_length')} tokens — {title}", fontsize=10)
    paths.append(_finish(fig, ax, out_dir / f"{name}_memory.png"))
    return paths


def write_all(result: dict, out_dir: str | Path, name: str, with_plots: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    if with_plots:
        for p in plots(result, out, name):
            paths[p.stem.rsplit("_", 1)[-1]] = p
    return paths
