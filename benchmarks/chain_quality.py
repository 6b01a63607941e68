"""Errors along chains of reuse: quality at each link of successive variants, with and
without the serving path's depth cap (SmolLM2, in-process, the engine's public API).

    python -m benchmarks.chain_quality [--lengths 512 1024] [--docs 8] [--links 5] [--cap 2]
                                       [--config '{"recompute_min_tokens": 128}'] [--name chain-quality-smollm2]

Link 0 is a document; link i+1 replaces ``ratio`` of link i's sentences. Each link reuses
the entry the server would have registered before it:

* ``uncapped``: every link registers its (approximate) KV; link i reuses link i-1's, so
  its reference has derivation depth i-1;
* ``refresh``: ``serve_app`` with ``max_reuse_depth=cap, depth_cap_policy=refresh``: a
  link whose KV would be deeper than the cap registers an exact prefill (depth 0);
* ``skip``: such a link registers nothing, so the next link reuses the last entry that
  was registered (an older link, depth <= cap);
* ``one_hit`` (the yardstick): link i reuses the exact KV of link i-1 (a full prefill's),
  i.e. one hit on the same prompt with no chain behind it.

Quality of each link's hit, teacher-forced on the full prefill's greedy continuation of
``steps`` tokens: top-1 agreement, perplexity ratio (hit / full) and first-token
agreement, pooled over the documents per link and policy and checked against the
one-hit thresholds of the engine benchmark (``benchmarks.report.GATE``: agreement median
>= 0.95 and p10 >= 0.90, first token >= 0.9, median ppl ratio <= 1.02).
Writes ``benchmarks/results/<name>.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from .metrics import ppl_ratio, quantile
from .report import GATE

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("one_hit", "uncapped", "refresh", "skip")


def link_gate(rows: list[dict]) -> dict:
    """Pooled quality of one link under one policy, and the thresholds it fails."""
    import statistics

    agree = [r["agreement"] for r in rows]
    ppl = [r["ppl_ratio"] for r in rows]
    first = sum(r["first_token"] for r in rows) / len(rows)
    out = {"n": len(rows), "agreement_median": statistics.median(agree), "agreement_p10": quantile(agree, 0.1),
           "first_token": first, "ppl_ratio_median": statistics.median(ppl),
           "ref_depth": sorted({r["ref_depth"] for r in rows}),
           "recomputed_share": statistics.median(r["recomputed"] / r["tokens"] for r in rows)}
    failed = [name for name, ok in (
        ("agreement median", out["agreement_median"] >= GATE["agreement_median"]),
        ("agreement p10", out["agreement_p10"] >= GATE["agreement_p10"]),
        ("first token", first >= GATE["first_token_agree"]),
        ("ppl median", out["ppl_ratio_median"] <= GATE["ppl_ratio_median"])) if not ok]
    out["failed"] = failed
    return out


def run_document(eng, doc: list[str], d: int, a, pool: list[str], policies: tuple[str, ...] = POLICIES) -> list[dict]:
    from semshare_core.prompts import encode_text

    from . import dataset
    from .methods import teacher_force

    links = [doc]
    for i in range(a.links):
        links.append(dataset.edit_sentences(links[-1], "replace", a.ratio, random.Random(f"{d}:{i}"), pool))
    ids = [encode_text(eng.tokenizer, dataset.build_prompt(s)) for s in links]
    first = eng.export_kv(eng.prefill(ids[0]))
    ref = {p: (first, 0) for p in policies}  # policy -> (entry it reuses, that entry's depth)
    rows = []
    for i in range(1, len(links)):
        full = eng.prefill(ids[i])
        exact = eng.export_kv(full)
        cont, _, nll_full = teacher_force(eng, full, a.steps)
        row = {"length": a.length, "doc": d, "link": i, "tokens": int(ids[i].size)}
        done: dict[int, tuple] = {}  # id(reference) -> (result, exported) : policies sharing a reference share the hit
        for policy in policies:
            packed, depth = ref[policy]
            if id(packed) not in done:
                hit = eng.prefill(ids[i], packed)
                exported = eng.export_kv(hit)  # before teacher forcing changes the cache
                recomputed = int(hit.stats.recomputed_tokens)
                _, argmax, nll = teacher_force(eng, hit, a.steps, target=cont)
                agree = sum(int(x == y) for x, y in zip(argmax, cont)) / len(cont)
                done[id(packed)] = ({"ref_depth": depth, "agreement": round(agree, 4),
                                     "ppl_ratio": round(ppl_ratio(nll, nll_full, a.steps), 4),
                                     "first_token": argmax[0] == cont[0], "recomputed": recomputed,
                                     "tokens": int(ids[i].size)}, exported, hit.exact)
            res, exported, was_exact = done[id(packed)]
            row[policy] = res
            new_depth = 0 if was_exact else depth + 1
            if policy == "one_hit":
                ref[policy] = (exact, 0)
            elif policy == "uncapped" or new_depth <= a.cap:
                ref[policy] = (exported, new_depth)
            elif policy == "refresh":
                ref[policy] = (exact, 0)
            # skip: nothing registered, the next link reuses the same entry again
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chain_quality")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--links", type=int, default=5)
    p.add_argument("--cap", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", default="{}", help="SemShareConfig overrides as JSON (default: the engine default)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--name", default="chain-quality-smollm2")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)

    import torch

    from semshare_core import SemShareConfig, SemShareEngine
    from semshare_core.models import load_smollm2

    from . import dataset

    overrides = json.loads(a.config)
    cfg = SemShareConfig.from_dict(overrides)
    torch.set_num_threads(a.threads)
    lm = load_smollm2()
    eng = SemShareEngine(lm.model, lm.tokenizer, cfg)
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    rows: list[dict] = []
    for length in a.lengths:
        a.length = length
        for d, doc in enumerate(dataset.make_documents(a.docs, length, count, seed=11)):
            rows += run_document(eng, doc, d, a, pool, tuple(a.policies))
    summary = {str(length): {policy: {str(i): link_gate([r[policy] for r in rows
                                                          if r["length"] == length and r["link"] == i])
                                      for i in range(1, a.links + 1)} for policy in a.policies}
               for length in a.lengths}
    cfg_desc = overrides or "engine default"
    out = {"config": {k: v for k, v in vars(a).items() if k != "length"}, "engine_config": cfg.to_dict(),
           "thresholds": GATE, "rows": rows, "summary": summary}
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Chains of {a.links} variants (SmolLM2, {a.docs} documents per length, {a.ratio:.0%} of sentences "
             f"replaced per link, {a.steps} teacher-forced tokens, config: {cfg_desc})", "",
             "Per link, pooled over the documents: teacher-forced top-1 agreement median / p10, first-token "
             "agreement, median perplexity ratio (hit / full), median recomputed share at layer 1, reference depths; "
             "`ok` when all four one-hit thresholds hold (agreement median >= 0.95, p10 >= 0.90, first token >= 0.9, "
             "ppl <= 1.02).", ""]
    for length in a.lengths:
        lines += [f"## ~{length} tokens", "", "| link | " + " | ".join(a.policies) + " |",
                  "| ---: |" + " --- |" * len(a.policies)]
        for i in range(1, a.links + 1):
            cells = []
            for policy in a.policies:
                s = summary[str(length)][policy][str(i)]
                verdict = "ok" if not s["failed"] else "fails " + ", ".join(s["failed"])
                cells.append(f"{s['agreement_median']:.3f} / {s['agreement_p10']:.3f}, {s['first_token']:.2f}, "
                             f"{s['ppl_ratio_median']:.3f}, {s['recomputed_share']:.2f}, d{s['ref_depth']}: {verdict}")
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
        lines.append("")
    (d / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
