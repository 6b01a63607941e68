"""Where a decode token's time goes, at batch 1 and batch 8 (in-process, no serving).

    python -m benchmarks.decode_profile                 # SmolLM2-135M bf16, 1 thread
    python -m benchmarks.decode_profile --contexts 100 1000 --batches 1 8 --steps 10
    python -m benchmarks.decode_profile --attention native native+compiled   # eager vs compiled step

Runs :func:`semshare_core.batch.batch_step` (the scheduler's decode step) on B requests of
a given context length with each ``--attention`` (SDPA per request, and the native kernel of
:mod:`semshare_core.decode_kernel`), ``--rounds`` interleaved rounds of ``--steps`` steps each, and
reports the step's wall time (median, min-max over rounds) and, from one profiled round,
the share of the step spent in the linear layers (matmuls, LM head included), attention
(one SDPA call per request and layer), KV appends (the copies into each request's
buffers) and everything else (norms, rotary, activations, Python and dispatch). The
native kernel's share is its ``semshare::decode_attention`` profiler range, which also
holds the Python that prepares its arguments and the range's own profiling overhead, so
it reads high; the step times (unprofiled rounds) are what compare the two. An arm
``<attention>+compiled`` runs the same step compiled as one graph
(:mod:`semshare_core.compiled_decode`; compiled once before the runs; a batch of one stays
eager there); the markdown gives each arm's per-round step-time ratio to the first arm.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
LINEAR = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
             "semshare::decode_attention")


def classify(rows: list[tuple[str, float]]) -> dict[str, float]:
    """Self CPU time (us) per op name -> ``{linear, attention, kv_append, other}`` shares of the total."""
    total = sum(t for _, t in rows) or 1.0
    out = {"linear": 0.0, "attention": 0.0, "kv_append": 0.0, "other": 0.0}
    for name, t in rows:
        if name in LINEAR:
            out["linear"] += t
        elif name in ATTENTION:
            out["attention"] += t
        elif name == "aten::copy_":
            out["kv_append"] += t
        else:
            out["other"] += t
    return {k: round(v / total, 3) for k, v in out.items()}


def measure(engine, context: int, batch: int, steps: int, rounds: int, kernels: dict, seed: int = 0,
            compiled=None) -> list[dict]:
    """Step time of each attention in ``kernels`` (name -> kernel or None), rounds interleaved.
    A name ending in ``+compiled`` runs the step through ``compiled``
    (:class:`semshare_core.compiled_decode.CompiledDecode`, already compiled) with that kernel."""
    from torch.profiler import ProfilerActivity, profile

    from semshare_core.batch import batch_step as eager_step

    def batch_step(model, seqs, toks, kern, name=""):
        if name.endswith("+compiled"):
            return compiled.step(seqs, toks, kern)
        return eager_step(model, seqs, toks, kern)

    rng = np.random.default_rng(seed)
    vocab = engine.signature.vocab_size
    out = []
    with torch.inference_mode():
        prompts = [rng.integers(100, vocab - 1, context) for _ in range(batch)]
        seqs = {name: [engine.decode_state(engine.prefill(p)) for p in prompts] for name in kernels}
        toks = [5] * batch
        per_round = {name: [] for name in kernels}
        for name, kern in kernels.items():
            batch_step(engine.model, seqs[name], toks, kern, name)
        for _ in range(rounds):
            for name, kern in kernels.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    batch_step(engine.model, seqs[name], toks, kern, name)
                per_round[name].append((time.perf_counter() - t0) / steps * 1e3)
        for name, kern in kernels.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    batch_step(engine.model, seqs[name], toks, kern, name)
            rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
            med = statistics.median(per_round[name])
            shares = classify(rows)
            total_ms = sum(t for _, t in rows) / 1e3 / steps  # profiled self time per step
            out.append({"attention_impl": name, "context": context, "batch": batch, "step_ms": round(med, 2),
                        "step_ms_min": round(min(per_round[name]), 2), "step_ms_max": round(max(per_round[name]), 2),
                        "ms_per_token": round(med / batch, 2), "shares": shares,
                        "per_round_ms": [round(x, 2) for x in per_round[name]],
                        "linear_ms": round(shares["linear"] * total_ms, 2),
                        "attention_ms": round(shares["attention"] * total_ms, 2)})
    return out


def weight_bytes(model) -> int:
    """Bytes of every ``nn.Linear`` weight (what a decode step streams from memory; LM head included)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def kv_bytes(engine, context: int, batch: int) -> int:
    """Bytes of the K and V rows a decode step reads: ``batch`` requests of ``context`` rows."""
    sig = engine.signature
    return batch * context * sig.num_layers * 2 * sig.num_kv_heads * sig.head_dim * engine.dtype.itemsize


def read_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """This thread's memory read bandwidth (GB/s): median of ``reps`` sums over a tensor far larger than the caches."""
    x = torch.ones(mb << 19, dtype=torch.bfloat16)  # mb MiB
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return round(x.numel() * x.element_size() / statistics.median(times) / 1e9, 2)


def markdown(res: dict) -> str:
    lines = [f"# Decode step profile `{res['name']}`", "",
             f"{res['model']} {res['dtype']}, {res['threads']} torch thread(s), prepacked linears: "
             f"{res['prepacked']}, on {res['machine']}; load average before/after {res['loadavg']}.", "",
             f"Step time: median of {res['rounds']} rounds x {res['steps']} steps (min-max); shares from one "
             "profiled round (self CPU time by op).", "",
             "| attention | context | batch | step ms (min-max) | ms per token | linear | attention | KV append | other |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["runs"]:
        s = r["shares"]
        lines.append(f"| {r.get('attention_impl', 'sdpa')} | {r['context']} | {r['batch']} | "
                     f"{r['step_ms']} ({r['step_ms_min']}-{r['step_ms_max']}) | "
                     f"{r['ms_per_token']} | {s['linear']:.0%} | {s['attention']:.0%} | {s['kv_append']:.0%} | "
                     f"{s['other']:.0%} |")
    arms = list(dict.fromkeys(r.get("attention_impl", "sdpa") for r in res["runs"]))
    if len(arms) > 1 and all(r.get("per_round_ms") for r in res["runs"]):
        base = arms[0]
        lines += ["", f"Step time against `{base}`, per round (the arms run interleaved in each round): "
                  "median (min-max) of the rounds' ratios.", "",
                  "| context | batch | " + " | ".join(f"{a} / {base}" for a in arms[1:]) + " |",
                  "| ---: | ---: |" + " ---: |" * (len(arms) - 1)]
        for ctx, b in dict.fromkeys((r["context"], r["batch"]) for r in res["runs"]):
            by = {r.get("attention_impl", "sdpa"): r["per_round_ms"] for r in res["runs"]
                  if (r["context"], r["batch"]) == (ctx, b)}
            cells = []
            for a in arms[1:]:
                xs = [x / y for x, y in zip(by.get(a, []), by.get(base, []))]
                cells.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-")
            lines.append(f"| {ctx} | {b} | " + " | ".join(cells) + " |")
    if res.get("compile_s") is not None:
        lines += ["", f"The compiled step (`compile_decode`) compiled in {res['compile_s']} s before the runs "
                  "(not in the step times)."]
    if res.get("read_gbs"):
        lines += ["", f"Against memory bandwidth: this thread reads {res['read_gbs']} GB/s (sum over a 256 MiB "
                  f"tensor, median of 5, before the runs). A step streams {res['weight_mb']} MB of linear weights; "
                  "attention reads each request's K and V rows.", "",
                  "| attention | context | batch | linear ms | weights GB/s | attention ms | KV MB | KV GB/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["runs"]:
            if not r.get("linear_ms"):
                continue
            kv = r["kv_mb"]
            att = f"{kv / r['attention_ms']:.1f}" if r.get("attention_ms") else "-"
            lines.append(f"| {r.get('attention_impl', 'sdpa')} | {r['context']} | {r['batch']} | {r['linear_ms']} | "
                         f"{res['weight_mb'] / r['linear_ms']:.1f} | {r['attention_ms']} | {kv} | {att} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import os

    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-prepack", action="store_true")
    p.add_argument("--attention", nargs="+", choices=("sdpa", "native", "native+compiled", "sdpa+compiled"),
                   default=["sdpa", "native"],
                   help="decode attention(s) to time, interleaved (native: semshare_core.decode_kernel; "
                   "+compiled: the step compiled by semshare_core.compiled_decode)")
    p.add_argument("--name", default="decode-profile-cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load_smollm2()
    engine = SemShareEngine(lm.model, lm.tokenizer, prepack=not a.no_prepack)
    before = [round(x, 2) for x in os.getloadavg()]
    read_gbs = read_bandwidth_gbs()
    from semshare_core import decode_kernel

    native = decode_kernel.load()
    if native is None and any(x.startswith("native") for x in a.attention):
        print(f"native decode attention unavailable: {decode_kernel.unavailable_reason() or 'build failed'}")
    kernels = {k: (native if k.startswith("native") else None) for k in a.attention
               if not k.startswith("native") or native is not None}
    compiled, compile_s = None, None
    if any(k.endswith("+compiled") for k in kernels):
        from semshare_core.compiled_decode import CompiledDecode

        compiled = CompiledDecode(engine.model)
        t0 = time.perf_counter()
        measure(engine, 16, 2, 2, 1, {k: v for k, v in kernels.items() if k.endswith("+compiled")}, compiled=compiled)
        compile_s = round(time.perf_counter() - t0, 1)
        if not compiled.active:
            raise SystemExit(f"the compiled step is unavailable: {compiled.failed}")
    runs = []
    for ctx in a.contexts:
        for b in a.batches:
            for run in measure(engine, ctx, b, a.steps, a.rounds, kernels, compiled=compiled):
                run["kv_mb"] = round(kv_bytes(engine, ctx, b) / 1e6, 1)
                runs.append(run)
                print(run, flush=True)
    res = {"name": a.name, "model": "SmolLM2-135M-Instruct", "dtype": str(engine.dtype).replace("torch.", ""),
           "threads": a.threads, "prepacked": engine.prepacked, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "loadavg": [before, [round(x, 2) for x in os.getloadavg()]], "steps": a.steps, "rounds": a.rounds,
           "read_gbs": read_gbs, "weight_mb": round(weight_bytes(lm.model) / 1e6, 1), "runs": runs,
           "compile_s": compile_s}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{a.name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
