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

``--workload reuse`` runs ``benchmarks.load``'s reuse workload instead, on the same
prompts (:mod:`benchmarks.sweep_workloads`, fresh documents every round): per level the
families' references (~1k-token documents, full prefills) complete first, then their
follow-ups (edited variants and identical repeats, shuffled) go to ``c`` client threads.
A variant is a hit on its reference's KV as a replica's hot tier holds it (the exported
``PackedKV``, as a tensor view); a repeat replays the reference's entry (first token at
submit). Reported besides tokens/s and requests/s: the references' phase, TTFT per kind,
and the steps split into decode-only steps and steps with prefill work (count, median ms,
total seconds), i.e. where the engine's time goes. Registration of the follow-ups' KV
(a copy the replica makes off the engine thread) is not done here.

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
KINDS = ("reference", "variant", "repeat")  # the reuse workload's request kinds


def run_threads(target, arg_tuples: list[tuple]) -> None:
    """One thread per argument tuple running ``target``; returns when all have finished."""
    threads = [threading.Thread(target=target, args=args) for args in arg_tuples]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def bench_engine(model: str, compile_mode: str = "off"):
    """``(engine, label)`` for ``--model``: ``smollm2`` (the embedded default, bf16) or ``tiny``
    (a random-weight Llama, fp32, with an offline tokenizer). ``compile_mode`` sets the
    engine's ``compile_decode`` and ``compile_prefill`` (the server's default is ``auto``);
    compiled passes are warmed up before the rounds."""
    from semshare_core import SemShareEngine

    if model == "smollm2":
        from semshare_core.models import load_smollm2

        lm = load_smollm2()
        eng = SemShareEngine(lm.model, lm.tokenizer, compile_decode=compile_mode, compile_prefill=compile_mode)
        eng.warm_compiled_decode()
        eng.warm_compiled_prefill()
        return eng, f"SmolLM2-135M-Instruct bf16, compile {compile_mode}"
    from semshare_core.models import tiny_random_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer(512)
    return SemShareEngine(tiny_random_model("llama", vocab_size=len(tok)), tok), "tiny random Llama fp32"


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
        run_threads(client, [(k,) for k in range(clients)])
        wall = time.perf_counter() - t0
        steps = [s for s in sched.history if s.decoded]
    finally:
        sched.stop()
    return {"clients": clients, "requests": clients * per_client, "output_tokens": tokens[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 2),
            "mean_decode_batch": round(statistics.mean(s.decoded for s in steps), 2) if steps else 0.0,
            "mean_step_ms": round(statistics.mean(s.ms for s in steps), 2) if steps else 0.0}


def run_reuse_level(engine, clients: int, seed: int, new_tokens: int = 32, length: int = 1024,
                    max_running: int = 16) -> dict:
    """One reuse level (see the module docstring): references, then follow-ups on ``clients`` threads."""
    from semshare_core.prompts import encode_text
    from semshare_core.scheduler import GenParams, Request, Scheduler, SchedulerConfig

    from . import sweep_workloads as sw

    tok = engine.tokenizer
    sweep = sw.build_sweep(lambda t: len(tok(t, add_special_tokens=False)["input_ids"]), [clients], seed=seed,
                           reuse_tokens=length)
    first, rest = sw.reuse_phases(sweep.levels[clients].families, seed=seed)
    sched = Scheduler(engine, SchedulerConfig(max_running=max_running))
    sched.start()
    entries: dict[int, tuple] = {}    # family -> (the reference's exported PackedKV, its KV tensor)
    lock = threading.Lock()
    recs: list[dict] = []
    t0 = time.perf_counter()

    def one(item: dict) -> None:
        ids = encode_text(tok, item["prompt"])
        done, rec, got = threading.Event(), {"kind": item["kind"], "sent_s": time.perf_counter() - t0, "tokens": 0}, {}

        def sink(ev):
            if ev[0] == "token":
                rec["tokens"] += 1
                rec.setdefault("ttft_ms", (time.perf_counter() - t0 - rec["sent_s"]) * 1e3)
            elif ev[0] == "prefilled":
                got["pre"] = ev[1]
                rec["hit"] = bool(ev[1].stats.hit)
            elif ev[0] in ("finished", "error"):
                rec["ok"] = ev[0] == "finished"
                done.set()

        ref, ref_kv = entries.get(item["family"], (None, None)) if item["kind"] != "reference" else (None, None)
        params = GenParams(max_new_tokens=new_tokens, temperature=0.0, stop_on_eos=False)
        sched.submit(Request(ids=ids, params=params, sink=sink, reference=ref, reference_kv=ref_kv,
                             early_first_token=ref is not None and item["kind"] == "repeat"))
        done.wait()
        if item["kind"] == "reference" and "pre" in got:
            with torch.inference_mode():
                packed = engine.export_kv(got["pre"])
            entries[item["family"]] = (packed, packed.to_torch(engine.device, engine.dtype))  # as a hot tier keeps it
        rec["end_s"] = time.perf_counter() - t0
        with lock:
            recs.append(rec)

    def client(queue: list[dict]) -> None:
        while True:
            with lock:
                if not queue:
                    return
                item = queue.pop(0)
            one(item)

    try:
        for phase in (list(first), list(rest)):
            run_threads(client, [(phase,)] * clients)
        wall = time.perf_counter() - t0
        steps = list(sched.history)
    finally:
        sched.stop()
    refs_end = max((r["end_s"] for r in recs if r["kind"] == "reference"), default=0.0)
    dec_only = [s for s in steps if s.decoded and not s.prefill_tokens]
    with_pre = [s for s in steps if s.prefill_tokens]
    tokens = sum(r["tokens"] for r in recs)

    def kind_ttft(kind: str) -> float | None:
        xs = [r["ttft_ms"] for r in recs if r["kind"] == kind and "ttft_ms" in r]
        return round(statistics.median(xs), 1) if xs else None

    return {"clients": clients, "requests": len(recs), "ok": sum(bool(r.get("ok")) for r in recs),
            "output_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(recs) / wall, 3), "references_s": round(refs_end, 3),
            "ttft_ms": {k: kind_ttft(k) for k in KINDS},
            "hits": {k: sum(bool(r.get("hit")) for r in recs if r["kind"] == k) for k in KINDS},
            "mean_decode_batch": round(statistics.mean(s.decoded for s in steps if s.decoded), 2) if steps else 0.0,
            "mean_step_ms": round(statistics.mean(s.ms for s in steps if s.decoded), 2) if steps else 0.0,
            "decode_only_steps": len(dec_only),
            "decode_only_step_ms": round(statistics.median(s.ms for s in dec_only), 1) if dec_only else 0.0,
            "decode_only_s": round(sum(s.ms for s in dec_only) / 1e3, 3),
            "prefill_steps": len(with_pre),
            "prefill_step_ms": round(statistics.median(s.ms for s in with_pre), 1) if with_pre else 0.0,
            "prefill_s": round(sum(s.ms for s in with_pre) / 1e3, 3)}


REUSE_MEDIANS = ("requests_per_s", "references_s", "decode_only_steps", "decode_only_step_ms", "decode_only_s",
                 "prefill_steps", "prefill_step_ms", "prefill_s")


def summarize(runs: list[dict]) -> dict:
    """Per level: tokens/s median and min-max over rounds, mean batch and step time (medians);
    reuse levels also the medians of :data:`REUSE_MEDIANS` and of the TTFT per kind."""
    out = {}
    for c in sorted({r["clients"] for r in runs}):
        rs = [r for r in runs if r["clients"] == c]
        tps = [r["tokens_per_s"] for r in rs]
        out[c] = {"tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps), "n": len(tps)},
                  "mean_decode_batch": statistics.median(r["mean_decode_batch"] for r in rs),
                  "mean_step_ms": statistics.median(r["mean_step_ms"] for r in rs)}
        if "ttft_ms" in rs[0]:
            out[c].update({k: statistics.median(r[k] for r in rs) for k in REUSE_MEDIANS})
            out[c]["ttft_ms"] = {k: statistics.median(v) if (v := [r["ttft_ms"][k] for r in rs
                                                                     if r["ttft_ms"][k] is not None]) else None
                                 for k in rs[0]["ttft_ms"]}
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


def markdown_reuse(res: dict) -> str:
    lines = [f"# The scheduler alone on the reuse workload `{res['name']}`", "",
             f"{res['model']}, {res['conditions']}. `benchmarks.load`'s reuse workload in-process: per level "
             f"fresh families of ~{res['length']}-token documents (2 edited variants and 1 identical repeat each); "
             f"the references complete first, then the follow-ups go to the level's client threads; "
             f"{res['new_tokens']} greedy tokens (EOS ignored); {res['rounds']} rounds. A variant is a hit on its "
             "reference's exported KV (as a hot tier holds it), a repeat replays it. Medians over rounds; "
             "steps: decode-only steps and steps with prefill work (a prefill chunk, a hit or a replay, plus "
             "that step's decode).", "",
             "| clients | tok/s median (min-max) | req/s | references phase s | TTFT ms reference / variant / "
             "repeat | decode-only steps: n, median ms, total s | prefill steps: n, median ms, total s | "
             "mean decode batch |",
             "| ---: | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    for c, s in res["summary"].items():
        t, tt = s["tokens_per_s"], s["ttft_ms"]
        ttft = " / ".join("-" if tt[k] is None else f"{tt[k]:.0f}" for k in KINDS)
        lines.append(f"| {c} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {s['requests_per_s']:.2f} | "
                     f"{s['references_s']:.1f} | {ttft} | {s['decode_only_steps']:.0f}, "
                     f"{s['decode_only_step_ms']:.0f}, {s['decode_only_s']:.1f} | {s['prefill_steps']:.0f}, "
                     f"{s['prefill_step_ms']:.0f}, {s['prefill_s']:.1f} | {s['mean_decode_batch']:.1f} |")
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
    ap.add_argument("--workload", choices=("decode", "reuse"), default="decode")
    ap.add_argument("--length", type=int, default=1024, help="reuse: document length (tokens)")
    ap.add_argument("--reuse-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="reuse: prompts of round r are benchmarks.load's with "
                    "--seed SEED+r at that level (the same documents for the same seed)")
    ap.add_argument("--compile", choices=("off", "auto", "on"), default="auto",
                    help="compile_decode and compile_prefill of the engine (the server's default: auto)")
    ap.add_argument("--name", default="scheduler-load-cpu")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    engine, label = bench_engine(a.model, a.compile)
    load0 = os.getloadavg()
    runs = []
    for r in range(a.rounds):
        for c in a.clients:
            if a.workload == "reuse":
                lvl = run_reuse_level(engine, c, seed=a.seed + r, new_tokens=a.reuse_new_tokens, length=a.length)
            else:
                lvl = run_level(engine, c, a.per_client, a.prompt_tokens, a.new_tokens, seed=r)
            runs.append({"round": r + 1, **lvl})
    reuse = a.workload == "reuse"
    res = {"name": a.name, "model": label, "workload": a.workload, "clients": a.clients, "per_client": a.per_client,
           "prompt_tokens": a.prompt_tokens, "new_tokens": a.reuse_new_tokens if reuse else a.new_tokens,
           "length": a.length, "rounds": a.rounds,
           "conditions": f"{a.threads} torch thread(s), {platform.machine()}, affinity "
                         f"{sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}, "
                         f"load average {list(load0)} -> {list(os.getloadavg())}",
           "runs": runs, "summary": {str(k): v for k, v in summarize(runs).items()}}
    save(a.out_dir, a.name, res, markdown_reuse(res) if reuse else markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
