"""A hit with eager vs compiled decoder layers, beside the compiled full prefill, in-process.

    python -m benchmarks.compiled_hit                          # SmolLM2-135M bf16, 1 thread
    python -m benchmarks.compiled_hit --lengths 1024 2048 --sources 3 4 --prompts 3 --rounds 6

One engine with ``compile_prefill="on"`` (the server's default on a bf16 CPU): its full
prefill is compiled, and its hits run their decoder layers through one compiled graph
(:mod:`semshare_core.compiled_selective`); the eager-layers arm is the same engine with
that graph switched off. The prompts are :mod:`benchmarks.rag`'s RAG-shaped ones
(passages of 3-4 cached prompts, ``prefill_multi`` over the sources ``lookup_sources``
picks). Per prompt, ``--rounds`` rounds of the three arms (order rotating) and reports:
each arm's median time, the per-round ratios full / hit (both hit arms) and compiled /
eager hit (median, min-max), and how far the compiled hit's first logits are from the
eager hit's (largest absolute difference, same argmax, and each hit's argmax against
the full prefill's). Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("full", "hit_eager", "hit_compiled")


def rotate_rounds(arms, rounds: int, run, after=None):
    """One untimed call of ``run(arm)`` per arm (allocator, caches), then ``rounds`` rounds with
    the order rotating. Returns the untimed results, the times (ms) per arm, and per arm the
    values ``after(arm, result)`` gave (when it is given)."""
    first = {arm: run(arm) for arm in arms}
    times = {arm: [] for arm in arms}
    seen = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            t0 = time.perf_counter()
            pre = run(arm)
            int(torch.argmax(pre.logits))
            times[arm].append((time.perf_counter() - t0) * 1e3)
            if after is not None:
                seen[arm].append(after(arm, pre))
            del pre
    return first, times, seen


def ratio(times: dict, num: str, den: str) -> dict:
    """Per-round ``times[num] / times[den]``: median and range."""
    xs = [a / b for a, b in zip(times[num], times[den])]
    return {"median": round(statistics.median(xs), 3), "range": [round(min(xs), 3), round(max(xs), 3)]}


def rr(x: dict) -> str:
    return f"{x['median']:.2f} ({x['range'][0]:.2f}-{x['range'][1]:.2f})"


def measure(eng, ids, sources, rounds: int) -> dict:
    """Rounds of the three arms on one prompt (``eng.compiled_selective`` toggled for the
    eager-layers arm); times in ms."""
    compiled = eng.compiled_selective

    def run(arm):
        eng.compiled_selective = compiled if arm == "hit_compiled" else None
        try:
            return eng.prefill(ids) if arm == "full" else eng.prefill_multi(ids, sources)
        finally:
            eng.compiled_selective = compiled

    first, times, _ = rotate_rounds(ARMS, rounds, run)
    ratios = functools.partial(ratio, times)

    a, b, f = first["hit_eager"].logits, first["hit_compiled"].logits, first["full"].logits
    st = first["hit_compiled"].stats
    return {"tokens": int(ids.size), "hit": bool(st.hit), "rows_layer1": st.rows_per_layer[1] if st.hit else None,
            **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()},
            "speedup_eager_hit": ratios("full", "hit_eager"), "speedup_compiled_hit": ratios("full", "hit_compiled"),
            "compiled_over_eager_hit": ratios("hit_compiled", "hit_eager"),
            "per_round": {k: [round(x, 1) for x in v] for k, v in times.items()},
            "logit_max_abs_diff": round(float((a - b).abs().max()), 4),
            "same_argmax": int(a.argmax()) == int(b.argmax()),
            "eager_hit_first_token_as_full": int(a.argmax()) == int(f.argmax()),
            "compiled_hit_first_token_as_full": int(b.argmax()) == int(f.argmax())}


def _med(runs, key):
    return statistics.median(r[key]["median"] for r in runs)


def markdown(res: dict) -> str:
    runs = res["runs"]
    lines = [f"# A hit's decoder layers eager vs compiled `{res['name']}`", "",
             f"{res['model']} {res['dtype']}, {res['threads']} torch thread(s), on {res['machine']}; load average "
             f"before/after {res['loadavg']}. One engine with `compile_prefill=on` (full prefill compiled; the "
             f"hits' layer graph switched off for the eager arm), compiled before the runs in {res['compile_s']} s. "
             f"RAG-shaped prompts of `benchmarks.rag` (seed {res['seed']}), `prefill_multi` over the sources "
             f"`lookup_sources` picks. {res['rounds']} rounds per prompt, order rotating; ratios per round.", "",
             f"Median over prompts of each prompt's median ratio: full / eager hit **{_med(runs, 'speedup_eager_hit'):.2f}x**, "
             f"full / compiled hit **{_med(runs, 'speedup_compiled_hit'):.2f}x**, compiled / eager hit "
             f"**{_med(runs, 'compiled_over_eager_hit'):.3f}**. First token as the full prefill's: eager hit "
             f"{sum(r['eager_hit_first_token_as_full'] for r in runs)}/{len(runs)}, compiled hit "
             f"{sum(r['compiled_hit_first_token_as_full'] for r in runs)}/{len(runs)}.", "",
             "| tokens | sources | rows at layer 1 | full ms | eager hit ms | compiled hit ms | full / eager hit "
             "(min-max) | full / compiled hit (min-max) | compiled / eager hit (min-max) | logits max abs diff "
             "| same argmax |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    for r in runs:
        lines.append(f"| {r['tokens']} | {r.get('sources', '')} | {r['rows_layer1']} | {r['full_ms']} | "
                     f"{r['hit_eager_ms']} | {r['hit_compiled_ms']} | {rr(r['speedup_eager_hit'])} | "
                     f"{rr(r['speedup_compiled_hit'])} | {rr(r['compiled_over_eager_hit'])} | "
                     f"{r['logit_max_abs_diff']} | {r['same_argmax']} |")
    return "\n".join(lines) + "\n"


def rag_hits(lengths, sources, prompts: int, seed: int, threads: int):
    """SmolLM2-135M bf16 with ``compile_prefill="on"`` (warmed), and the RAG-shaped prompts of
    :mod:`benchmarks.rag` that find sources: ``(engine, compile_s, [(ids, [PackedKV, ...])])``,
    the sources as ``lookup_sources`` picks them after every cached prompt was prefilled."""
    from semshare_core import SemanticIndex, SemShareConfig, SemShareEngine
    from semshare_core.models import load_smollm2

    from .rag import build

    torch.set_num_threads(threads)
    lm = load_smollm2()
    cfg = SemShareConfig.from_dict({"seed": seed})
    eng = SemShareEngine(lm.model, lm.tokenizer, cfg, compile_prefill="on")
    compile_s = eng.warm_compiled_prefill()
    if not (eng.compiled_prefill.active and eng.compiled_selective.active):
        raise SystemExit(f"a compiled pass is unavailable: {eng.compiled_prefill.failed or eng.compiled_selective.failed}")

    def count(text):
        return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(text):
        return eng.encode_chat([{"role": "user", "content": text}])

    data = build(lengths, sources, prompts, 0, 8, seed, count)
    index = SemanticIndex(cfg.fingerprint_dim, max_items=4096, max_bytes=1 << 40)
    for e in data["cached"]:
        ids = encode(e["text"])
        packed = eng.export_kv(eng.prefill(ids))
        index.add(e["key"], eng.fingerprint(ids), ids, packed.nbytes, packed)
    hits = []
    for item in data["new"]:
        ids = encode(item["text"])
        cov = index.lookup_sources(eng.fingerprint(ids), ids, threshold=cfg.sim_threshold, k=cfg.source_candidates,
                                   max_sources=cfg.max_sources, min_gain=cfg.source_min_gain,
                                   min_sim=cfg.source_min_sim, ngram=cfg.ngram)
        if cov is not None:
            hits.append((ids, [m.entry.payload for m in cov.matches]))
    return eng, compile_s, hits


def parser(prog: str, description: str, name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--sources", type=int, nargs="+", default=[3, 4])
    p.add_argument("--prompts", type=int, default=2, help="prompts per (length, sources)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--name", default=name)
    p.add_argument("--out-dir", default=str(RESULTS))
    return p


def run_all(a, measure_one, to_markdown, check=None) -> int:
    """:func:`rag_hits` for the parsed args ``a``, ``measure_one(eng, ids, sources, rounds)`` on
    every prompt, saved with ``to_markdown``; ``check(eng)``: a reason to stop, or None."""
    if a.rounds < 5:
        print("note: fewer than 5 rounds")
    eng, compile_s, hits = rag_hits(a.lengths, a.sources, a.prompts, a.seed, a.threads)
    if check is not None and (why := check(eng)):
        raise SystemExit(why)
    before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for ids, sources in hits:
        runs.append({**measure_one(eng, ids, sources, a.rounds), "sources": len(sources)})
        print(runs[-1], flush=True)
    res = {"name": a.name, "model": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "threads": a.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rounds": a.rounds, "seed": a.seed,
           "loadavg": [before, [round(x, 2) for x in os.getloadavg()]], "compile_s": round(compile_s, 1),
           "runs": runs}
    save(a.out_dir, a.name, res, to_markdown(res))
    return 0


def main(argv=None) -> int:
    a = parser("python -m benchmarks.compiled_hit", __doc__.splitlines()[0], "compiled-hit-cpu").parse_args(argv)
    return run_all(a, measure, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
