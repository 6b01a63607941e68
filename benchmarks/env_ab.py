"""The replica's scheduler with and without a process environment setting, interleaved.

    THP=THP_MEM_ALLOC_ENABLE=1
    taskset -c 1 python -m benchmarks.env_ab --env $THP --workload reuse --clients 8 --rounds 6

Some settings only act at process start (torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its
first allocation; glibc its ``MALLOC_*`` variables), so an A/B needs two processes. This
starts two workers, one with the given ``--env`` variables (``on``) and one without them
(``off``), each loading the same engine (:func:`benchmarks.scheduler_load.bench_engine`).
Then, round by round with the order alternating, it asks one worker and then the other to
run one level of :mod:`benchmarks.scheduler_load` (``reuse``: its reuse level; ``decode``:
its decode-heavy level) with the round's seed, so both see the same prompts in the same
window of this noisy box; the idle worker waits on a pipe. Reported: per arm the medians
(min-max) of tokens/s and step times, and the per-round ratio on / off.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("tokens_per_s", "decode_only_step_ms", "prefill_step_ms", "mean_step_ms")


def worker(model: str, compile_mode: str, threads: int, report: list[str]) -> None:
    """Load the engine, say ``ready`` (with the values of the ``report`` variables it sees),
    then run one level per request line (JSON) on stdin."""
    import torch

    from .scheduler_load import bench_engine, run_level, run_reuse_level

    torch.set_num_threads(threads)
    engine, label = bench_engine(model, compile_mode)
    print(json.dumps({"ready": label, "env": {k: os.environ.get(k) for k in report}}), flush=True)
    for line in sys.stdin:
        q = json.loads(line)
        if q["workload"] == "reuse":
            res = run_reuse_level(engine, q["clients"], seed=q["seed"], new_tokens=q["new_tokens"], length=q["length"])
        else:
            res = run_level(engine, q["clients"], q["per_client"], q["prompt_tokens"], q["new_tokens"], seed=q["seed"])
        print(json.dumps(res), flush=True)


def _start(env_extra: dict, a) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in a.env_keys}
    env.update(env_extra)
    p = subprocess.Popen([sys.executable, "-m", "benchmarks.env_ab", "--worker", "--model", a.model,
                          "--compile", a.compile, "--threads", str(a.threads), "--report", *sorted(a.env_keys)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                         cwd=str(Path(__file__).resolve().parent.parent))
    return p


def _read(p: subprocess.Popen) -> dict:
    while True:
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"a worker exited (code {p.poll()}); see its stderr above")
        if line.startswith("{"):
            return json.loads(line)


def _stats(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = [f"# Scheduler with and without `{' '.join(res['env'])}` `{res['name']}`", "",
             f"{res['model']}, {res['threads']} torch thread(s), {res['conditions']}. Two worker processes "
             f"(`on` with the setting, `off` without), {res['rounds']} rounds, order alternating, the "
             f"`{res['workload']}` level of `benchmarks.scheduler_load` at {res['clients']} clients with the round's "
             f"seed on both.", "",
             f"tokens/s on / off per round: **{s['ratio']['median']:.3f}** ({s['ratio']['min']:.3f}-"
             f"{s['ratio']['max']:.3f}).", "",
             "| round | first | tok/s on | tok/s off | on / off | decode-only step ms on / off | prefill step ms on / off |",
             "| ---: | --- | ---: | ---: | ---: | --- | --- |"]
    for r in res["rounds_data"]:
        on, off = r["on"], r["off"]
        lines.append(f"| {r['round']} | {r['first']} | {on['tokens_per_s']} | {off['tokens_per_s']} | "
                     f"{on['tokens_per_s'] / off['tokens_per_s']:.3f} | {on.get('decode_only_step_ms')} / "
                     f"{off.get('decode_only_step_ms')} | {on.get('prefill_step_ms')} / {off.get('prefill_step_ms')} |")
    lines += ["", "| metric | on median (min-max) | off median (min-max) |", "| --- | --- | --- |"]
    for k in KEYS:
        if k in s["on"]:
            lines.append(f"| {k} | {s['on'][k]['median']} ({s['on'][k]['min']}-{s['on'][k]['max']}) | "
                         f"{s['off'][k]['median']} ({s['off'][k]['min']}-{s['off'][k]['max']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.env_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--env", nargs="+", default=[], help="NAME=VALUE settings of the 'on' worker")
    ap.add_argument("--workload", choices=("decode", "reuse"), default="reuse")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 (reuse), 128 (decode)")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=112)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--compile", choices=("off", "auto", "on"), default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--name", default="env-ab")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.model, a.compile, a.threads, a.report)
        return 0
    try:
        on_env = dict(kv.split("=", 1) for kv in a.env)
    except ValueError:
        ap.error("--env takes NAME=VALUE")
    if not on_env:
        ap.error("give at least one --env NAME=VALUE")
    a.env_keys = set(on_env)
    if a.rounds < 5:
        print("note: fewer than 5 rounds")
    new_tokens = a.new_tokens or (32 if a.workload == "reuse" else 128)
    procs = {"on": _start(on_env, a), "off": _start({}, a)}
    label, seen = "", {}
    try:
        for arm, p in procs.items():
            ready = _read(p)
            label, seen[arm] = ready["ready"], ready["env"]
        rounds = []
        for r in range(a.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            row = {"round": r + 1, "first": order[0]}
            for arm in order:
                q = {"workload": a.workload, "clients": a.clients, "seed": a.seed + r, "new_tokens": new_tokens,
                     "length": a.length, "per_client": a.per_client, "prompt_tokens": a.prompt_tokens}
                procs[arm].stdin.write(json.dumps(q) + "\n")
                procs[arm].stdin.flush()
                row[arm] = _read(procs[arm])
            rounds.append(row)
            print(f"round {r + 1}: on {row['on']['tokens_per_s']} off {row['off']['tokens_per_s']} tok/s", flush=True)
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
        for p in procs.values():
            p.wait(timeout=60)
    summary = {arm: {k: _stats([row[arm][k] for row in rounds]) for k in KEYS if k in rounds[0][arm]}
               for arm in ("on", "off")}
    summary["ratio"] = _stats([row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"] for row in rounds])
    res = {"name": a.name, "env": a.env, "model": label, "workload": a.workload, "clients": a.clients,
           "rounds": a.rounds, "threads": a.threads,
           "conditions": f"affinity {sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}",
           "worker_env": seen, "rounds_data": rounds, "summary": summary}
    save(a.out_dir, a.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
