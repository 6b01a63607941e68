"""The concurrency sweep behind ``python -m benchmarks.load --workload decode|reuse|both|repeat``.

Clients speak OpenAI ``/v1/completions`` with ``stream: true`` (:mod:`benchmarks.openai_stream`),
so the same run targets our server or any OpenAI-compatible peer (vLLM). Per workload and
per client count, ``c`` clients pull requests from one queue; the level's wall time runs
from its first request to its last response. Reuse levels have two phases: every
family's reference completes before its variants and repeats are sent.

Cache isolation between levels: each level gets fresh documents (the prompt stream hands
out every sentence once, :mod:`benchmarks.sweep_workloads`) AND its own ``cache_salt``
(``<run>-<workload>-c<clients>``; our server namespaces its index by it, vLLM mixes it into
its prefix-cache block hashes), so a level can't hit another level's (or run's) entries.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

from . import openai_stream as oai
from . import sweep_report, sweep_workloads


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


async def run_phases(url: str, model: str, phases: list[list[dict]], concurrency: int, max_tokens: int,
                     salt: Optional[str], headers: dict, timeout_s: float, ignore_eos: bool = False,
                     progress: str = "", transport: Optional[httpx.AsyncBaseTransport] = None
                     ) -> tuple[list[dict], float]:
    """Run the phases one after the other with ``concurrency`` clients; (records, wall seconds)."""
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as client:
        t0 = time.perf_counter()
        n = 0
        for phase in phases:
            queue: asyncio.Queue = asyncio.Queue()
            for item in phase:
                queue.put_nowait(item)

            async def worker():
                nonlocal n
                while True:
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    body = oai.completion_body(model, item["prompt"], max_tokens, salt, ignore_eos)
                    t_send = time.perf_counter() - t0
                    rec = await oai.stream_completion(client, url, body, headers)
                    rec.update({k: v for k, v in item.items() if k != "prompt"}, sent_s=round(t_send, 3))
                    records.append(rec)
                    n += 1
                    if progress and sys.stderr.isatty():
                        print(f"\r{progress} {n} done", end="", file=sys.stderr, flush=True)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return records, wall


def level_phases(workload: str, lp: sweep_workloads.LevelPrompts, seed) -> list[list[dict]]:
    if workload == "decode":
        return [[{"kind": "decode", "prompt": p} for p in lp.decode]]
    first, rest = sweep_workloads.reuse_phases(lp.families, f"{seed}:{lp.concurrency}")
    return [first, rest]


async def warmup(url: str, model: str, headers: dict, timeout_s: float) -> None:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for _ in range(2):
            await oai.stream_completion(client, url, oai.completion_body(model, "Warm-up: say hello.", 8), headers)


async def run_repeat(url: str, model: str, prompts: dict[int, list[str]], max_tokens: int, salt: Optional[str],
                     headers: dict, timeout_s: float) -> list[dict]:
    """Each prompt sent once, then again verbatim, one request at a time (a salt per pair)."""
    pairs = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for n, ps in prompts.items():
            for i, p in enumerate(ps):
                # each pair its own salt: the first send must not hit an earlier pair's entry (our
                # server matches by similarity, so other prose of the same corpus can hit)
                body = oai.completion_body(model, p, max_tokens, f"{salt}-{n}-{i}" if salt else None)
                first = await oai.stream_completion(client, url, body, headers)
                repeat = await oai.stream_completion(client, url, body, headers)
                pairs.append({"length": n, "i": i, "first": first, "repeat": repeat})
                print(json.dumps({"repeat": n, "i": i, "first_ttft_ms": first["ttft_ms"],
                                  "repeat_ttft_ms": repeat["ttft_ms"], "repeat_cached": repeat.get("cached_tokens"),
                                  "status": [first["status"], repeat["status"]]}), flush=True)
    return pairs


async def _served_model(url: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        return await oai.served_model(client, url)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=1))
    (out / f"{result['name']}.md").write_text(sweep_report.markdown(result))


def run(a, count_tokens, url: str, server_note: str) -> dict:
    """Drive the sweep for parsed CLI args ``a``; writes results after every level."""
    levels = [int(x) for x in str(a.concurrency).split(",") if x.strip()]
    workloads = {"both": ["decode", "reuse"], "decode": ["decode"], "reuse": ["reuse"], "repeat": [],
                 "all": ["decode", "reuse"]}[a.workload]
    do_repeat = a.workload in ("repeat", "all")
    prompts = sweep_workloads.build_sweep(
        count_tokens, levels, seed=a.seed, decode_tokens=a.decode_tokens, decode_per_client=a.decode_per_client,
        decode_min=a.decode_min, reuse_tokens=a.length, variants=a.variants, repeats=a.repeats, rounds=a.rounds,
        families_min=a.families_min, repeat_lengths=tuple(int(x) for x in a.repeat_lengths.split(",")),
        repeat_n=a.repeat_n)
    headers = {"X-Tenant": a.tenant} if a.tenant else {}
    model = a.model or asyncio.run(_served_model(url))
    run_id = a.run_id or f"r{int(time.time())}"
    out = Path(a.out_dir)
    result = {"name": a.name,
              "target": {"label": a.label, "url": url, "model": model},
              "conditions": {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                             "loadavg_before": loadavg(), "loadavg_after": None,
                             "client_cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                             "server_note": server_note, "run_id": run_id,
                             "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "config": {"concurrency": levels, "workload": a.workload, "seed": a.seed,
                         "decode_tokens": a.decode_tokens, "decode_new_tokens": a.decode_new_tokens,
                         "decode_per_client": a.decode_per_client, "decode_min": a.decode_min,
                         "reuse_tokens": a.length, "reuse_new_tokens": a.reuse_new_tokens, "variants": a.variants,
                         "repeats": a.repeats, "rounds": a.rounds, "families_min": a.families_min,
                         "repeat_lengths": a.repeat_lengths, "repeat_n": a.repeat_n,
                         "repeat_new_tokens": a.repeat_new_tokens, "salt": not a.no_salt, "tenant": a.tenant,
                         "ignore_eos": a.ignore_eos, "timeout_s": a.timeout_s},
              "workloads": {}, "records": {}}
    asyncio.run(warmup(url, model, headers, a.timeout_s))
    for wl in workloads:
        new_tokens = a.decode_new_tokens if wl == "decode" else a.reuse_new_tokens
        result["workloads"][wl] = {}
        result["records"][wl] = {}
        for c in levels:
            salt = None if a.no_salt else f"{run_id}-{wl}-c{c}"
            phases = level_phases(wl, prompts.levels[c], a.seed)
            before = loadavg()
            recs, wall = asyncio.run(run_phases(url, model, phases, c, new_tokens, salt, headers, a.timeout_s,
                                                a.ignore_eos, progress=f"{wl} c={c}"))
            s = sweep_report.summarize_level(recs, wall)
            s["loadavg_before"], s["loadavg_after"] = before, loadavg()
            result["workloads"][wl][str(c)] = s
            sweep_report.add_scaling(result["workloads"][wl])
            result["records"][wl][str(c)] = recs
            print(json.dumps({"workload": wl, "clients": c, **{k: v for k, v in s.items() if k != "by_kind"}}),
                  flush=True)
            result["conditions"]["loadavg_after"] = loadavg()
            write(result, out)
    if do_repeat:
        salt = None if a.no_salt else f"{run_id}-repeat"
        pairs = asyncio.run(run_repeat(url, model, prompts.repeat, a.repeat_new_tokens, salt, headers, a.timeout_s))
        result["repeat"] = sweep_report.summarize_repeat(pairs)
        result["records"]["repeat"] = pairs
    result["conditions"]["loadavg_after"] = loadavg()
    result["conditions"]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(result, out)
    print(sweep_report.markdown(result))
    return result
