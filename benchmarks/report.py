"""Turn a result dict into ``<name>.json``, ``<name>.md`` and three PNG plots."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("full", "prefix", "semshare_r0", "semshare", "semshare_pruned", "semshare_r1")
BASE_METHODS = set(METHOD_ORDER)
MARKERS = dict(zip(METHOD_ORDER, "osD^vP"))


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(x, spec=".2f"):
    if x is None:
        return "–"
    return format(x, spec)


def _methods(records) -> list[str]:
    present = {r["method"] for r in records}
    ordered = [m for m in METHOD_ORDER if m in present]
    return ordered + sorted(present - set(ordered))


def summary_by_length(records) -> list[dict]:
    """Per (length, method) medians over pairs (means for first-token agreement)."""
    groups = defaultdict(list)
    for r in records:
        if r["method"] in BASE_METHODS:
            groups[(r["length"], r["method"])].append(r)
    rows = []
    for length in sorted({k[0] for k in groups}):
        for m in _methods([r for (l, _), rs in groups.items() if l == length for r in rs]):
            rs = groups[(length, m)]
            rows.append({
                "length": length, "method": m, "pairs": len(rs), "n_tokens": _med([r["n_tokens"] for r in rs]),
                "ttft_ms": _med([r["ttft_ms"] for r in rs]), "speedup": _med([r["speedup"] for r in rs]),
                "flop_proxy": _med([r["flop_proxy"] for r in rs]), "kv_mb": _med([r["kv_bytes"] / 2**20 for r in rs]),
                "reused_share": _med([r["reused_share"] for r in rs]), "rouge_l": _med([r.get("rouge_l") for r in rs]),
                "first_token_agree": _mean([r.get("first_token_agree") for r in rs]),
                "ppl_ratio": _med([r.get("ppl_ratio") for r in rs]),
                "fetch_ms": _med([r["fetch_ms"] for r in rs]), "mapping_ms": _med([r["mapping_ms"] for r in rs]),
                "gather_ms": _med([r["gather_ms"] for r in rs]), "prefill_ms": _med([r["prefill_ms"] for r in rs]),
            })
    return rows


def summary_by_edit(records) -> list[dict]:
    """Per (edit kind, ratio, method) quality, medians over lengths and documents."""
    groups = defaultdict(list)
    for r in records:
        if r["method"] in BASE_METHODS:
            groups[(r["edit"], r["ratio"], r["method"])].append(r)
    rows = []
    for (edit, ratio, m), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _rank(kv[0][2]))):
        rows.append({"edit": edit, "ratio": ratio, "method": m, "rouge_l": _med([r.get("rouge_l") for r in rs]),
                     "first_token_agree": _mean([r.get("first_token_agree") for r in rs]),
                     "ppl_ratio": _med([r.get("ppl_ratio") for r in rs]),
                     "reused_share": _med([r["reused_share"] for r in rs]),
                     "speedup": _med([r["speedup"] for r in rs]),
                     "similarity": _med([r.get("similarity") for r in rs])})
    return rows


def _rank(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def memory_sweep(records, length) -> list[dict]:
    """SemShare at several retentions (recompute ratio = default) on one length."""
    rs = [r for r in records if r["length"] == length and r["kind"] == "semshare"
          and r["recompute_ratio"] not in (0.0, 1.0)]
    full = [r for r in records if r["length"] == length and r["method"] == "full"]
    rows = []
    if full:
        rows.append({"retention": "full prefill", "kv_mb": _med([r["kv_bytes"] / 2**20 for r in full]),
                     "rouge_l": 1.0, "ppl_ratio": 1.0, "speedup": 1.0, "pairs": len(full)})
    for ret in sorted({r["retention"] for r in rs}, reverse=True):
        g = [r for r in rs if r["retention"] == ret]
        rows.append({"retention": ret, "kv_mb": _med([r["kv_bytes"] / 2**20 for r in g]),
                     "rouge_l": _med([r.get("rouge_l") for r in g]), "ppl_ratio": _med([r.get("ppl_ratio") for r in g]),
                     "speedup": _med([r["speedup"] for r in g]), "pairs": len(g)})
    return rows


def markdown(result: dict) -> str:
    cfg, mach, recs = result["config"], result["machine"], result["records"]
    hw = mach.get("gpu") or f"{mach.get('cpu')} ({mach.get('cpu_count')} cores, {mach.get('torch_threads')} torch threads)"
    out = [f"# Benchmark `{cfg['name']}`", "",
           f"Model **{result['model_name']}** ({result['model']['layers']} layers, {result['model']['params'] / 1e6:.0f} M "
           f"params), {cfg['dtype']}, device `{cfg['device']}` on {hw}; torch {mach['torch']}, transformers "
           f"{mach['transformers']}. Reference KV placement: `{cfg['kv_placement']}`. Edits {', '.join(cfg['edits'])} at "
           f"ratios {', '.join(map(str, cfg['ratios']))}; {cfg['pairs']} document(s) per length; {cfg['new_tokens']} greedy "
           f"tokens; TTFT = median of {cfg['reps']} timed runs after a warm-up. Wall time {result.get('elapsed_s', 0):.0f} s"
           + (f"; {result['skipped_pairs']} pair(s) skipped by the time budget" if result.get("skipped_pairs") else "")
           + ".", "",
           "Speedup, ROUGE-L, ppl ratio and reuse: medians over pairs; first-token agreement: share of pairs. "
           "FLOP proxy = sum of rows each layer processed / (n x layers). KV MB = decode cache after the prefill. "
           "ROUGE-L and ppl ratio are against the full prefill's greedy continuation.", "",
           "## By prompt length", "",
           "| length | method | tokens | TTFT ms | speedup | FLOP proxy | KV MB | reused | ROUGE-L | first tok | ppl ratio |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary_by_length(recs):
        out.append(f"| {r['length']} | {r['method']} | {_fmt(r['n_tokens'], '.0f')} | {_fmt(r['ttft_ms'], '.1f')} | "
                   f"{_fmt(r['speedup'])}x | {_fmt(r['flop_proxy'])} | {_fmt(r['kv_mb'], '.1f')} | "
                   f"{_fmt(r['reused_share'], '.0%')} | {_fmt(r['rouge_l'])} | {_fmt(r['first_token_agree'], '.0%')} | "
                   f"{_fmt(r['ppl_ratio'], '.3f')} |")
    out += ["", "## Where the reuse time goes (medians, ms)", "",
            "fetch = `PackedKV.from_bytes` of the stored blob (0 for host/device placement); mapping = token mapping; "
            "gather = gather + re-rotation (prefix: building the cache); prefill = the forward pass(es).", "",
            "| length | method | TTFT | fetch | mapping | gather | prefill | full prefill |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = summary_by_length(recs)
    full_ms = {r["length"]: r["ttft_ms"] for r in rows if r["method"] == "full"}
    for r in rows:
        if r["method"] == "full":
            continue
        out.append(f"| {r['length']} | {r['method']} | {_fmt(r['ttft_ms'], '.1f')} | {_fmt(r['fetch_ms'], '.1f')} | "
                   f"{_fmt(r['mapping_ms'], '.1f')} | {_fmt(r['gather_ms'], '.1f')} | {_fmt(r['prefill_ms'], '.1f')} | "
                   f"{_fmt(full_ms.get(r['length']), '.1f')} |")
    out += ["", "## Quality by edit (medians over lengths)", "",
            "similarity = fingerprint cosine of variant and reference (the index admits >= "
            f"{cfg['semshare_config']['sim_threshold']}).", "",
            "| edit | ratio | method | similarity | reused | speedup | ROUGE-L | first tok | ppl ratio |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary_by_edit(recs):
        out.append(f"| {r['edit']} | {r['ratio']:g} | {r['method']} | {_fmt(r['similarity'])} | "
                   f"{_fmt(r['reused_share'], '.0%')} | {_fmt(r['speedup'])}x | {_fmt(r['rouge_l'])} | "
                   f"{_fmt(r['first_token_agree'], '.0%')} | {_fmt(r['ppl_ratio'], '.3f')} |")
    mem_len = cfg.get("memory_length")
    sweep = memory_sweep(recs, mem_len)
    if sweep:
        out += ["", f"## Decode KV memory vs retention (SemShare, recompute {cfg['semshare_config']['recompute_ratio']}, "
                f"length {mem_len})", "",
                "| retention | KV MB | ROUGE-L | ppl ratio | speedup | pairs |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sweep:
            ret = r["retention"] if isinstance(r["retention"], str) else f"{r['retention']:g}"
            out.append(f"| {ret} | {_fmt(r['kv_mb'], '.1f')} | {_fmt(r['rouge_l'])} | {_fmt(r['ppl_ratio'], '.3f')} | "
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
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in _methods(recs):
        pts = [(r["length"], r["speedup"]) for r in rows if r["method"] == m and r["speedup"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker=MARKERS.get(m, "x"), label=m, linestyle="--" if m == "full" else "-", alpha=0.85)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.set_xlabel("prompt length (tokens, nominal)")
    ax.set_ylabel("TTFT speedup vs full prefill (median)")
    ax.set_title(f"TTFT speedup — {title}")
    ax.legend()
    paths.append(_finish(fig, ax, out_dir / f"{name}_speedup.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ratio_recs = [r for r in recs if r["edit"] != "instruction" and r.get("rouge_l") is not None
                  and r["method"] in BASE_METHODS]
    methods = _methods(ratio_recs)
    for i, m in enumerate(methods):
        by = defaultdict(list)
        for r in ratio_recs:
            if r["method"] == m:
                by[r["ratio"]].append(r["rouge_l"])
        if by:
            xs = sorted(by)
            off = (i - (len(methods) - 1) / 2) * 0.006  # small offsets so identical curves stay visible
            ax.plot([x + off for x in xs], [statistics.median(by[x]) for x in xs], marker=MARKERS.get(m, "x"),
                    label=m, linestyle="--" if m == "full" else "-", alpha=0.85)
    ax.set_xlabel("edit ratio (share of sentences edited; median over lengths and "
                  + ", ".join(e for e in cfg["edits"] if e != "instruction") + ")")
    ax.set_ylabel("ROUGE-L vs full prefill output (median)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"Output quality — {title}")
    ax.legend()
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
        q = [(r["retention"], r["rouge_l"]) for r in pts if r["rouge_l"] is not None]
        if q:
            ax2.plot(*zip(*q), marker="s", color="C3", label="ROUGE-L (right)")
        ax2.set_ylim(-0.02, 1.05)
        ax2.set_ylabel("ROUGE-L vs full prefill")
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
