"""The replica's prefill order on a reuse-shaped burst: FIFO against replays first (in-process).

    python -m benchmarks.prefill_order                       # SmolLM2-135M bf16, 1 thread, 5 rounds
    taskset -c 1 python -m benchmarks.prefill_order --rounds 5 --name prefill-order-cpu

``--docs`` documents of ~``--length`` tokens are prefilled and exported first (the cache).
Then one burst is submitted at once to :class:`semshare_core.scheduler.Scheduler`: per
document ``--variants`` edited variants (20 % of sentences replaced: hits) and one
identical repeat (a replay), shuffled, ``--new-tokens`` greedy tokens each. Each round runs
the burst with both orders, alternating which goes first: ``fifo`` (admission order) and
``replays_first`` (the scheduler's order: identical repeats, one KV copy each, before the
hits). Reported: wall time and output tokens/s of the burst, median TTFT of the repeats and
of the variants, mean completion time. Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from . import dataset
from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"
ORDERS = ("fifo", "replays_first")
METRICS = ("wall_s", "tokens_per_s", "ttft_repeat_s", "ttft_variant_s", "mean_done_s")


class _Unsorted(list):
    """A ``prefilling`` list whose ``sort`` does nothing: the scheduler keeps admission order."""

    def sort(self, *args, **kwargs) -> None:
        return None


def build_burst(engine, docs: int, length: int, variants: int, seed: int) -> list[tuple[str, object, object]]:
    """``[(kind, ids, reference)]``: ``variants`` edited variants and one repeat per cached document, shuffled."""
    count = lambda text: int(engine.encode(text).size)  # noqa: E731
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    burst = []
    for i, d in enumerate(dataset.make_documents(docs, length, count, seed=seed)):
        ids = engine.encode(dataset.build_prompt(d))
        entry = engine.export_kv(engine.prefill(ids))
        for v in range(variants):
            sents = dataset.edit_sentences(d, "replace", 0.2, random.Random(f"{seed}:{i}:{v}"), pool)
            burst.append(("variant", engine.encode(dataset.build_prompt(sents)), entry))
        burst.append(("repeat", ids, entry))
    random.Random(seed).shuffle(burst)
    return burst


def run_burst(engine, burst, order: str, new_tokens: int) -> dict:
    """Submit the whole burst at once and step the scheduler until every request is done."""
    from semshare_core.scheduler import GenParams, Request, Scheduler, SchedulerConfig

    sched = Scheduler(engine, SchedulerConfig(max_running=max(16, len(burst))))
    if order == "fifo":
        sched.prefilling = _Unsorted()
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    t0 = time.perf_counter()
    for k, (_, ids, ref) in enumerate(burst):
        def sink(ev, k=k):
            now = time.perf_counter() - t0
            if ev[0] == "token":
                first.setdefault(k, now)
            elif ev[0] in ("finished", "error"):
                done[k] = now
        sched.submit(Request(ids=ids, params=GenParams(max_new_tokens=new_tokens, stop_on_eos=False), sink=sink,
                             reference=ref))
    while sched.has_work() or sched._inbox:
        sched.step()
    wall = time.perf_counter() - t0
    ttft = lambda kind: statistics.median(first[k] for k, b in enumerate(burst) if b[0] == kind)  # noqa: E731
    return {"order": order, "wall_s": round(wall, 3), "tokens_per_s": round(new_tokens * len(burst) / wall, 2),
            "ttft_repeat_s": round(ttft("repeat"), 3), "ttft_variant_s": round(ttft("variant"), 3),
            "mean_done_s": round(statistics.mean(done.values()), 3)}


def run(engine, rounds: int, docs: int, length: int, variants: int, new_tokens: int, seed: int) -> dict:
    burst = build_burst(engine, docs, length, variants, seed)
    run_burst(engine, burst, "replays_first", new_tokens)  # warm-up, not counted
    per_round = []
    for r in range(rounds):
        for order in (ORDERS if r % 2 == 0 else ORDERS[::-1]):
            per_round.append({"round": r + 1, **run_burst(engine, burst, order, new_tokens)})
    summary = {}
    for order in ORDERS:
        xs = [x for x in per_round if x["order"] == order]
        summary[order] = {m: {"median": statistics.median(x[m] for x in xs), "min": min(x[m] for x in xs),
                              "max": max(x[m] for x in xs)} for m in METRICS}
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in
              ((next(x for x in per_round if x["round"] == r and x["order"] == "fifo"),
                next(x for x in per_round if x["round"] == r and x["order"] == "replays_first"))
               for r in range(1, rounds + 1))]
    return {"burst": {"docs": docs, "length": length, "variants": variants, "repeats": docs, "requests": len(burst),
                      "new_tokens": new_tokens, "seed": seed},
            "per_round": per_round, "summary": summary,
            "tokens_per_s_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def markdown(res: dict) -> str:
    b = res["burst"]
    lines = [f"# Prefill order on a reuse burst `{res['name']}`", "",
             f"{res['model']}, {res['conditions']}. In-process scheduler; {b['docs']} cached documents of "
             f"~{b['length']} tokens, then {b['requests']} requests at once ({b['variants']} edited variants and "
             f"1 identical repeat per document), {b['new_tokens']} greedy tokens each; {len(res['per_round']) // 2} "
             "rounds, the two orders alternating.", "",
             "| order | wall s | tok/s | TTFT repeats s | TTFT variants s | mean completion s |",
             "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda s: f"{s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})"  # noqa: E731
    for order, s in res["summary"].items():
        lines.append(f"| {order} | {fmt(s['wall_s'])} | {fmt(s['tokens_per_s'])} | {fmt(s['ttft_repeat_s'])} | "
                     f"{fmt(s['ttft_variant_s'])} | {fmt(s['mean_done_s'])} |")
    r = res["tokens_per_s_ratio"]
    lines += ["", f"tok/s replays_first / fifo per round: median {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}). "
              "Medians, (min-max) over rounds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--variants", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="prefill-order-cpu")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load_smollm2()
    engine = SemShareEngine(lm.model, lm.tokenizer)
    before = [round(x, 2) for x in os.getloadavg()]
    res = run(engine, a.rounds, a.docs, a.length, a.variants, a.new_tokens, a.seed)
    res.update(name=a.name, model=f"SmolLM2-135M-Instruct {str(engine.dtype).replace('torch.', '')}",
               conditions=f"{a.threads} torch thread(s), {platform.machine()} {os.cpu_count()} cores, load average "
                          f"{before} -> {[round(x, 2) for x in os.getloadavg()]}")
    save(a.out_dir, a.name, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
