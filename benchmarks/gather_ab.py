"""A hit's host gather + key re-rotation: the native one-pass kernel vs the torch path, in-process.

    python -m benchmarks.gather_ab                                # SmolLM2-135M bf16, 1 thread
    python -m benchmarks.gather_ab --lengths 2048 --sources 3 4 --prompts 2 --rounds 8

The engine and prompts are :func:`benchmarks.compiled_hit.rag_hits`' (``compile_prefill="on"``,
the server's default on a bf16 CPU; RAG-shaped prompts over the sources ``lookup_sources``
picks). Per prompt, ``--rounds`` rounds of three arms, order rotating: the compiled full
prefill, the hit with :mod:`semshare_core.gather_kernel` (``native``), and the same hit
with ``engine.gather_kernel = None`` (``torch``). Reports each arm's median time and the
hits' median ``gather_ms``, the per-round ratios full / hit for both hit arms and torch /
native hit (median, min-max), and whether the two hits' first logits are bit-identical.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import functools
import statistics

import torch

from .compiled_hit import _med, parser, ratio, rotate_rounds, rr, run_all
ARMS = ("full", "hit_native", "hit_torch")


def measure(eng, ids, sources, rounds: int) -> dict:
    """Rounds of the three arms on one prompt (``eng.gather_kernel`` set to None for the
    torch arm, then restored); times in ms."""
    kernel = eng.gather_kernel

    def run(arm):
        eng.gather_kernel = None if arm == "hit_torch" else kernel
        try:
            return eng.prefill(ids) if arm == "full" else eng.prefill_multi(ids, sources)
        finally:
            eng.gather_kernel = kernel

    first, times, gather = rotate_rounds(ARMS, rounds, run, lambda arm, pre: pre.stats.gather_ms)
    ratios = functools.partial(ratio, times)

    a, b = first["hit_native"], first["hit_torch"]
    return {"tokens": int(ids.size), "hit": bool(a.stats.hit), "sources": len(sources),
            **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()},
            **{f"{k}_gather_ms": round(statistics.median(gather[k]), 1) for k in ARMS[1:]},
            "speedup_native": ratios("full", "hit_native"), "speedup_torch": ratios("full", "hit_torch"),
            "torch_over_native": ratios("hit_torch", "hit_native"),
            "per_round": {k: [round(x, 1) for x in v] for k, v in times.items()},
            "same_logits": bool(torch.equal(a.logits, b.logits))}


def markdown(res: dict) -> str:
    runs = res["runs"]
    lines = [f"# A hit's gather + re-rotation: native kernel vs torch `{res['name']}`", "",
             f"{res['model']} {res['dtype']}, {res['threads']} torch thread(s), on {res['machine']}; load average "
             f"before/after {res['loadavg']}. One engine with `compile_prefill=on` (full prefill and the hits' "
             f"layers compiled); the torch arm is the same engine with `gather_kernel = None`. RAG-shaped prompts "
             f"of `benchmarks.rag` (seed {res['seed']}), `prefill_multi` over the sources `lookup_sources` picks. "
             f"{res['rounds']} rounds per prompt, order rotating; ratios per round.", "",
             f"Median over prompts of each prompt's median ratio: full / hit with the native gather "
             f"**{_med(runs, 'speedup_native'):.2f}x**, with the torch gather **{_med(runs, 'speedup_torch'):.2f}x**; "
             f"torch / native hit time **{_med(runs, 'torch_over_native'):.3f}**. First logits bit-identical: "
             f"{sum(r['same_logits'] for r in runs)}/{len(runs)}.", "",
             "| tokens | sources | full ms | hit ms native | hit ms torch | gather ms native | gather ms torch "
             "| full / hit native (min-max) | full / hit torch (min-max) | torch / native hit (min-max) "
             "| same logits |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    for r in runs:
        lines.append(f"| {r['tokens']} | {r['sources']} | {r['full_ms']} | {r['hit_native_ms']} | "
                     f"{r['hit_torch_ms']} | {r['hit_native_gather_ms']} | {r['hit_torch_gather_ms']} | "
                     f"{rr(r['speedup_native'])} | {rr(r['speedup_torch'])} | {rr(r['torch_over_native'])} | "
                     f"{r['same_logits']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parser("python -m benchmarks.gather_ab", __doc__.splitlines()[0], "gather-ab-cpu").parse_args(argv)
    return run_all(a, measure, markdown,
                   lambda eng: None if eng.gather_kernel else "the native gather kernel is unavailable here (see the log)")


if __name__ == "__main__":
    raise SystemExit(main())
