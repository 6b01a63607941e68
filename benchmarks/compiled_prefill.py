"""A full prefill eager vs compiled (``compile_prefill``), in-process, interleaved rounds.

    python -m benchmarks.compiled_prefill                       # SmolLM2-135M bf16, 1 thread
    python -m benchmarks.compiled_prefill --lengths 1024 2048 --rounds 6 --chunk 512

Two engines on one model: the eager one and one with ``compile_prefill="on"``
(:mod:`semshare_core.compiled_prefill`, compiled before the runs). Per length, the same
held-out prose prompt is prefilled in one piece and in ``--chunk``-token chunks (as the
scheduler does next to running streams) by both, in each of ``--rounds`` rounds (order
alternating). Reports each arm's median time (min-max) and the per-round ratio
compiled / eager (median, min-max), and how far the compiled logits are from the eager
ones (largest absolute difference, same argmax). Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"


def measure(eager, compiled, ids: np.ndarray, chunk: int | None, rounds: int) -> dict:
    """Interleaved rounds of ``eager`` and ``compiled`` prefilling ``ids``; times in ms."""
    times = {"eager": [], "compiled": []}
    arms = {"eager": eager, "compiled": compiled}
    for name, eng in arms.items():  # one untimed run each (allocator, caches)
        eng.prefill(ids, chunk=chunk)
    for r in range(rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            t0 = time.perf_counter()
            arms[name].prefill(ids, chunk=chunk)
            times[name].append((time.perf_counter() - t0) * 1e3)
    a, b = eager.prefill(ids, chunk=chunk).logits, compiled.prefill(ids, chunk=chunk).logits
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    return {"tokens": int(ids.size), "chunk": chunk,
            **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()},
            **{f"{k}_ms_range": [round(min(v), 1), round(max(v), 1)] for k, v in times.items()},
            "ratio": round(statistics.median(ratios), 3), "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "per_round": {k: [round(x, 1) for x in v] for k, v in times.items()},
            "logit_max_abs_diff": round(float((a - b).abs().max()), 4), "same_argmax": int(a.argmax()) == int(b.argmax())}


def markdown(res: dict) -> str:
    lines = [f"# Full prefill, eager vs compiled `{res['name']}`", "",
             f"{res['model']} {res['dtype']}, {res['threads']} torch thread(s), on {res['machine']}; load average "
             f"before/after {res['loadavg']}. Compiled once before the runs in {res['compile_s']} s. "
             f"{res['rounds']} rounds, order alternating; ratio = per-round compiled / eager.", "",
             "| tokens | chunks | eager ms (min-max) | compiled ms (min-max) | compiled / eager (min-max) | "
             "logits max abs diff | same argmax |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in res["runs"]:
        lines.append(f"| {r['tokens']} | {r['chunk'] or 'one piece'} | {r['eager_ms']} ({r['eager_ms_range'][0]}-"
                     f"{r['eager_ms_range'][1]}) | {r['compiled_ms']} ({r['compiled_ms_range'][0]}-"
                     f"{r['compiled_ms_range'][1]}) | {r['ratio']:.2f} ({r['ratio_range'][0]:.2f}-"
                     f"{r['ratio_range'][1]:.2f}) | {r['logit_max_abs_diff']} | {r['same_argmax']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2

    from .dataset import build_prompt, make_documents

    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_prefill", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--name", default="compiled-prefill-cpu")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load_smollm2()
    eager = SemShareEngine(lm.model, lm.tokenizer)
    compiled = SemShareEngine(lm.model, lm.tokenizer, compile_prefill="on")
    compile_s = compiled.warm_compiled_prefill()
    if not compiled.compiled_prefill.active:
        raise SystemExit(f"the compiled prefill is unavailable: {compiled.compiled_prefill.failed}")
    before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for n in a.lengths:
        docs = make_documents(1, n, lambda s: len(lm.tokenizer(s).input_ids), seed=a.seed + n)
        ids = eager.encode(build_prompt(docs[0]))
        for chunk in (None, a.chunk):
            if chunk is not None and chunk >= ids.size:
                continue
            runs.append(measure(eager, compiled, ids, chunk, a.rounds))
            print(runs[-1], flush=True)
    res = {"name": a.name, "model": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "threads": a.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rounds": a.rounds,
           "loadavg": [before, [round(x, 2) for x in os.getloadavg()]], "compile_s": round(compile_s, 1),
           "runs": runs}
    save(a.out_dir, a.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
