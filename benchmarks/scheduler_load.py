"""The replica's scheduler alone under concurrent clients: the ceiling the serving path adds to.

    python -m benchmarks.scheduler_load                       # SmolLM2-135M bf16, 1 thread
    python -m benchmarks.scheduler_load --clients 1 8 --rounds 3 --name scheduler-load-cpu

Runs :class:`semshare_core.scheduler.Scheduler` (the engine thread a model replica runs)
in-process, without Ray, HTTP or detokenization: ``c`` client threads each submit a
unique prompt of ``--prompt-tokens`` random ids (±12 %) with ``--new-tokens`` greedy
tokens (EOS ignored) and, when it finishes, the next one, until ``--per-client`` requests
each are done. Reported per level: output tokens/s over the level's wall time (median and
min-max over ``--rounds`` interleaved rounds), the scheduler's mean decode batch and step
time. Set ``taskset -c 1`` around it to compare with a server pinned to core 1: the
difference to ``benchmarks.load``'s decode-heavy figure at the same level is what the
serving path (Ray hops, ingress, proxy, Ray's background processes) costs.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"


def run_level(engine, clients: int, per_client: int, prompt_tokens: int, new_tokens: int, seed: int,
              max_running: int = 16) -> dict:
    """One level: ``clients`` threads, ``per_client`` requests each, closed loop. Returns the level's numbers."""
    from semshare_core.scheduler import GenParams, Request, Scheduler, SchedulerConfig

    rng = np.random.default_rng(seed)
    vocab = engine.signature.vocab_size
    lo, hi = max(2, int(prompt_tokens * 0.88)), max(3, int(prompt_tokens * 1.12) + 1)
    prompts = [rng.integers(min(100, vocab // 2), vocab - 1, int(rng.integers(lo, hi)))
               for _ in range(clients * per_client)]
    sched = Scheduler(engine, SchedulerConfig(max_running=max_running))
    sched.start()
    tokens = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_client):
            done = threading.Event()

            def sink(ev, done=done):
                if ev[0] == "token":
                    with lock:
                        tokens[0] += 1
                elif ev[0] in ("finished", "error"):
                    done.set()

            params = GenParams(max_new_tokens=new_tokens, temperature=0.0, stop_on_eos=False)
            sched.submit(Request(ids=prompts[k * per_client + j], params=params, sink=sink))
            done.wait()

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        steps = [s for s in sched.history if s.decoded]
    finally:
        sched.stop()
    return {"clients": clients, "requests": clients * per_client, "output_tokens": tokens[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 2),
            "mean_decode_batch": round(statistics.mean(s.decoded for s in steps), 2) if steps else 0.0,
            "mean_step_ms": round(statistics.mean(s.ms for s in steps), 2) if steps else 0.0}


def summarize(runs: list[dict]) -> dict:
    """Per level: tokens/s median and min-max over rounds, mean batch and step time (medians)."""
    out = {}
    for c in sorted({r["clients"] for r in runs}):
        rs = [r for r in runs if r["clients"] == c]
        tps = [r["tokens_per_s"] for r in rs]
        out[c] = {"tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps), "n": len(tps)},
                  "mean_decode_batch": statistics.median(r["mean_decode_batch"] for r in rs),
                  "mean_step_ms": statistics.median(r["mean_step_ms"] for r in rs)}
    return out


def markdown(res: dict) -> str:
    lines = [f"# The scheduler alone under concurrent clients `{res['name']}`", "",
             f"{res['model']}, {res['conditions']}. Closed loop: each client sends its next request when the "
             f"last one finished; {res['per_client']} requests per client, ~{res['prompt_tokens']}-token random "
             f"prompts, {res['new_tokens']} greedy tokens (EOS ignored); {res['rounds']} interleaved rounds.", "",
             "| clients | tok/s median (min-max) | x1 | mean decode batch | mean step ms |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    base = None
    for c, s in res["summary"].items():
        t = s["tokens_per_s"]
        base = base or t["median"]
        lines.append(f"| {c} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {t['median'] / base:.2f} | "
                     f"{s['mean_decode_batch']:.1f} | {s['mean_step_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scheduler_load", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=112)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="scheduler-load-cpu")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)

    from semshare_core import SemShareEngine

    torch.set_num_threads(a.threads)
    if a.model == "smollm2":
        from semshare_core.models import load_smollm2

        lm = load_smollm2()
        engine, label = SemShareEngine(lm.model, lm.tokenizer), "SmolLM2-135M-Instruct bf16"
    else:
        from semshare_core.models import tiny_random_model, train_tiny_tokenizer

        tok = train_tiny_tokenizer(512)
        engine, label = SemShareEngine(tiny_random_model("llama", vocab_size=len(tok)), tok), "tiny random Llama fp32"
    load0 = os.getloadavg()
    runs = []
    for r in range(a.rounds):
        for c in a.clients:
            runs.append({"round": r + 1, **run_level(engine, c, a.per_client, a.prompt_tokens, a.new_tokens, seed=r)})
    res = {"name": a.name, "model": label, "clients": a.clients, "per_client": a.per_client,
           "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "rounds": a.rounds,
           "conditions": f"{a.threads} torch thread(s), {platform.machine()}, affinity "
                         f"{sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}, "
                         f"load average {list(load0)} -> {list(os.getloadavg())}",
           "runs": runs, "summary": {str(k): v for k, v in summarize(runs).items()}}
    save(a.out_dir, a.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
