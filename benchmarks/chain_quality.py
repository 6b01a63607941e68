"""Errors along chains of reuse: quality at each link of 5 successive variants, with and
without the serving path's depth cap (SmolLM2, in-process, the engine's public API).

    python -m benchmarks.chain_quality [--length 512] [--cap 2] [--steps 32]

Link 0 is a document; link i+1 edits ``ratio`` of link i's sentences. Each link reuses
the previous registered entry, as the server does:

* ``uncapped``: every link registers its (approximate) KV; link i reuses link i-1's,
  so link i's reference has derivation depth i-1;
* ``capped``: as ``serve_app`` with ``max_reuse_depth=cap`` and ``depth_cap_policy=refresh``:
  a link whose KV would be deeper than the cap registers an exact prefill (depth 0).

Quality of each link's hit: teacher-forced top-1 agreement and NLL over the full
prefill's greedy continuation of ``steps`` tokens, and whether the first token matches.
Writes ``benchmarks/results/chain-quality-smollm2.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def agreement(eng, pre, tokens: list[int]) -> tuple[float, float, bool]:
    """(top-1 agreement, mean NLL, first token equal) of ``pre`` teacher-forced on ``tokens``."""
    import torch

    from semshare_core.prefill import layer_step, model_step

    logits, pos, nll, agree = pre.logits, int(pre.ids.size), 0.0, 0
    with torch.inference_mode():
        for i, tok in enumerate(tokens):
            agree += int(torch.argmax(logits)) == tok
            nll -= float(torch.log_softmax(logits.float(), dim=-1)[tok])
            if i + 1 == len(tokens):
                break
            logits = (layer_step(eng.model, tok, pos, pre.cache) if pre.explicit_positions
                      else model_step(eng.model, tok, pre.cache))
            pos += 1
    first = int(torch.argmax(pre.logits)) == tokens[0]
    return agree / len(tokens), nll / len(tokens), first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chain_quality")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--links", type=int, default=5)
    p.add_argument("--cap", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)

    import torch

    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2

    from . import dataset

    torch.set_num_threads(a.threads)
    lm = load_smollm2()
    eng = SemShareEngine(lm.model, lm.tokenizer)
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    rows = []
    for d, doc in enumerate(dataset.make_documents(a.docs, a.length, count, seed=11)):
        links = [doc]
        for i in range(a.links):
            links.append(dataset.edit_sentences(links[-1], "replace", a.ratio, random.Random(f"{d}:{i}"), pool))
        ids = [eng.encode(dataset.build_prompt(s)) for s in links]
        ref = {"uncapped": (eng.export_kv(eng.prefill(ids[0])), 0)}
        ref["capped"] = ref["uncapped"]
        for i in range(1, len(links)):
            full = eng.prefill(ids[i])
            cont = list(eng.decode(full, max_new_tokens=a.steps, temperature=0.0, stop_on_eos=False))
            row = {"doc": d, "link": i, "tokens": int(ids[i].size)}
            for policy in ("uncapped", "capped"):
                packed, depth = ref[policy]
                hit = eng.prefill(ids[i], packed)
                new_depth = 0 if hit.exact else depth + 1
                exported = eng.export_kv(hit)  # before decoding touches the cache
                agree, nll, first = agreement(eng, hit, cont)
                row[policy] = {"ref_depth": depth, "agreement": round(agree, 4), "nll": round(nll, 4),
                               "first_token": first, "recomputed": int(hit.stats.recomputed_tokens)}
                if policy == "capped" and new_depth > a.cap:
                    ref[policy] = (eng.export_kv(eng.prefill(ids[i])), 0)  # refresh: exact, depth 0
                else:
                    ref[policy] = (exported, new_depth)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for policy in ("uncapped", "capped"):
        for i in range(1, a.links + 1):
            rs = [r[policy] for r in rows if r["link"] == i]
            summary.setdefault(policy, {})[i] = {
                "ref_depth": [r["ref_depth"] for r in rs],
                "agreement": round(sum(r["agreement"] for r in rs) / len(rs), 4),
                "nll": round(sum(r["nll"] for r in rs) / len(rs), 4),
                "first_token": round(sum(r["first_token"] for r in rs) / len(rs), 3)}
    out = {"config": vars(a), "rows": rows, "summary": summary}
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "chain-quality-smollm2.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Chain of {a.links} variants (SmolLM2, ~{a.length} tokens, {a.ratio:.0%} of sentences replaced per "
             f"link, {a.docs} documents, {a.steps} teacher-forced tokens)", "",
             "Teacher-forced top-1 agreement with the full prefill's greedy continuation (mean NLL / first token "
             "equal share); reference depth per document in brackets.", "",
             "| link | uncapped | capped (max depth " + str(a.cap) + ", refresh) |", "| ---: | --- | --- |"]
    for i in range(1, a.links + 1):
        u, c = summary["uncapped"][i], summary["capped"][i]
        lines.append(f"| {i} | {u['agreement']:.3f} ({u['nll']:.3f} / {u['first_token']:.2f}) {u['ref_depth']} | "
                     f"{c['agreement']:.3f} ({c['nll']:.3f} / {c['first_token']:.2f}) {c['ref_depth']} |")
    (d / "chain-quality-smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
