"""A lone full prefill on an idle replica: one piece against ``prefill_chunk`` chunks (in-process).

    python -m benchmarks.idle_prefill                                   # SmolLM2-135M bf16, 1 thread
    taskset -c 1 python -m benchmarks.idle_prefill --lengths 1024 2048 --rounds 8 --name idle-prefill-cpu

One request at a time is submitted to :class:`semshare_core.scheduler.Scheduler` (what a
model replica runs), a fresh ~``length``-token prompt of random ids per round and length,
1 greedy token, under two configs that differ only in ``idle_prefill_tokens``: ``chunked``
(0: the prompt goes in ``prefill_chunk``-token chunks, as before) and ``one_piece`` (the
default: an idle scheduler prefills a prompt up to that many tokens in one forward).
Rounds alternate which goes first. Reported per length: TTFT (submit to first token) and
the engine thread's CPU time for the request, medians and min-max over rounds, and the
per-round ratio chunked / one piece. Writes ``benchmarks/results/<name>.json`` and ``.md``.
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
MODES = ("chunked", "one_piece")


def one_request(engine, ids: np.ndarray, idle_prefill_tokens: int, prefill_chunk: int) -> dict:
    """TTFT (s) and the engine thread's CPU seconds for one request on a fresh idle scheduler."""
    from semshare_core.scheduler import GenParams, Request, Scheduler, SchedulerConfig

    sched = Scheduler(engine, SchedulerConfig(prefill_chunk=prefill_chunk, max_step_tokens=prefill_chunk,
                                              idle_prefill_tokens=idle_prefill_tokens))
    done, got = threading.Event(), {}

    def sink(ev):
        if ev[0] == "token" and "ttft" not in got:
            got["ttft"] = time.perf_counter() - got["t0"]
        elif ev[0] in ("finished", "error"):
            got["end"] = ev[0]
            done.set()

    # the steps run on this thread (no engine thread): its CPU time is the request's
    t_cpu = time.thread_time()
    got["t0"] = time.perf_counter()
    sched.submit(Request(ids, GenParams(max_new_tokens=1, stop_on_eos=False), sink))
    steps = 0
    while not done.is_set():
        sched.step()
        steps += 1
    return {"ttft_s": got["ttft"], "cpu_s": time.thread_time() - t_cpu, "steps": steps, "end": got["end"]}


def _spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "n": len(xs)}


def run(engine, lengths: list[int], rounds: int, prefill_chunk: int = 512, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocab = engine.signature.vocab_size
    caps = {"chunked": 0, "one_piece": max(lengths)}
    per = []
    for n in lengths:
        warm = rng.integers(min(100, vocab // 2), vocab - 1, n)
        for mode in MODES:  # warm-up
            one_request(engine, warm, caps[mode], prefill_chunk)
        for r in range(rounds):
            ids = rng.integers(min(100, vocab // 2), vocab - 1, n)
            order = MODES if r % 2 == 0 else MODES[::-1]
            row = {"length": n, "round": r + 1, "first": order[0]}
            for mode in order:
                row[mode] = one_request(engine, ids, caps[mode], prefill_chunk)
            per.append(row)
    summary = {}
    for n in lengths:
        rows = [p for p in per if p["length"] == n]
        summary[str(n)] = {
            **{f"{m}_{k}": _spread([p[m][k] for p in rows]) for m in MODES for k in ("ttft_s", "cpu_s", "steps")},
            "ttft_ratio": _spread([p["chunked"]["ttft_s"] / p["one_piece"]["ttft_s"] for p in rows]),
            "cpu_ratio": _spread([p["chunked"]["cpu_s"] / p["one_piece"]["cpu_s"] for p in rows])}
    return {"lengths": lengths, "rounds": rounds, "prefill_chunk": prefill_chunk, "per_round": per,
            "summary": summary}


def markdown(res: dict) -> str:
    c = lambda d, k=1e3: f"{d['median'] * k:.0f} ({d['min'] * k:.0f}-{d['max'] * k:.0f})"  # noqa: E731
    r = lambda d: f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"  # noqa: E731
    lines = [f"# A lone full prefill on an idle scheduler: one piece vs chunks `{res['name']}`", "",
             f"{res['model']}, {res['conditions']}. One request at a time, 1 greedy token, a fresh random prompt "
             f"per round and length; `chunked` = `idle_prefill_tokens` 0 (chunks of {res['prefill_chunk']} "
             "tokens), `one_piece` = one forward; "
             f"{res['rounds']} rounds, alternating which runs first. Medians (min-max); ratios per round.", "",
             "| tokens | TTFT ms chunked | TTFT ms one piece | TTFT chunked / one piece | CPU ms chunked | "
             "CPU ms one piece | CPU chunked / one piece | steps chunked / one piece |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for n, s in res["summary"].items():
        lines.append(f"| {n} | {c(s['chunked_ttft_s'])} | {c(s['one_piece_ttft_s'])} | {r(s['ttft_ratio'])} | "
                     f"{c(s['chunked_cpu_s'])} | {c(s['one_piece_cpu_s'])} | {r(s['cpu_ratio'])} | "
                     f"{s['chunked_steps']['median']:.0f} / {s['one_piece_steps']['median']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.idle_prefill", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="idle-prefill-cpu")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)

    from .scheduler_load import bench_engine

    torch.set_num_threads(a.threads)
    engine, label = bench_engine(a.model)
    load0 = os.getloadavg()
    res = run(engine, a.lengths, a.rounds, a.prefill_chunk)
    res.update(name=a.name, model=label,
               conditions=f"{a.threads} torch thread(s), {platform.machine()}, affinity "
                          f"{sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}, "
                          f"load average {list(load0)} -> {list(os.getloadavg())}")
    save(a.out_dir, a.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
