"""Serving load benchmark: concurrent HTTP clients against ``serve run`` or any OpenAI-compatible server.

Concurrency sweep (default; :mod:`benchmarks.sweep`), streaming ``/v1/completions`` clients:

    python -m benchmarks.load --start-server --name load-ours            # pinned `serve run`, 1..16 clients
    python -m benchmarks.load --url http://127.0.0.1:8100 --label vllm-cpu --name load-vllm-cpu
    python -m benchmarks.load --workload decode --concurrency 1,8        # one workload, two levels
    python -m benchmarks.load --workload repeat --url ...                # TTFT of an identical repeat
    python -m benchmarks.load --compare load-ours.json load-vllm-cpu.json --name ours-vs-vllm

Reuse on vs off (``--workload onoff``; the native ``/v1/generate`` route, one concurrency):

    python -m benchmarks.load --workload onoff --start-server --concurrency 4
    python -m benchmarks.load --workload onoff --start-server --replicas 2 --num-cpus 0.9 --affinity on --modes reuse_on
    python -m benchmarks.load --combine a.json b.json --name cmp   # one table from several on/off runs

The workload is built offline (``benchmarks.dataset``) and is the same for both modes:
``docs`` documents of about ``length`` tokens; each is sent once as written, then
``repeats`` more times verbatim (re-asked questions) and as ``variants`` edited
variants (10-30 % of sentences replaced, or the instruction changed), interleaved with
``unrelated`` prompts of documents never seen before. ``concurrency`` clients pull
requests in order from one queue, in two phases: the documents' first requests all
complete before the rest start (so that a repeat never races its own first request). Each mode runs under its own tenant (``X-Tenant``)
so the two never share cache entries. Loopback only; bounded in count.

Writes ``benchmarks/results/<name>.json`` and ``<name>.md``: requests/s, p50/p99 of
server-side TTFT and client latency, hit rate, reused tokens, non-200 count, and for
the hits: the share served from a replica's hot tier and their TTFT p50/p99.

``--replicas`` / ``--num-cpus`` / ``--affinity`` (with ``--start-server``) override the
serve config's app args: model replicas, CPUs each, cache-affinity routing on/off.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from . import dataset

RESULTS = Path(__file__).resolve().parent / "results"


def build_workload(docs: int, length: int, repeats: int, variants: int, unrelated: int, seed: int,
                   count_tokens) -> list[dict]:
    """Ordered list of ``{"kind", "prompt"}``; the first prompt of each document comes first."""
    rng = random.Random(seed)
    all_docs = dataset.make_documents(docs + unrelated, length, count_tokens, seed=seed)
    seen, fresh = all_docs[:docs], all_docs[docs:]
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    first = [{"kind": "first", "prompt": dataset.build_prompt(d)} for d in seen]
    rest = []
    for i, d in enumerate(seen):
        rest += [{"kind": "repeat", "prompt": dataset.build_prompt(d)} for _ in range(repeats)]
        for v in range(variants):
            if v % 3 == 2:
                prompt = dataset.build_prompt(d, dataset.INSTRUCTIONS[1])
            else:
                sents = dataset.edit_sentences(d, "replace", rng.choice((0.1, 0.2, 0.3)), random.Random(f"{seed}:{i}:{v}"), pool)
                prompt = dataset.build_prompt(sents)
            rest.append({"kind": "similar", "prompt": prompt})
    rest += [{"kind": "unrelated", "prompt": dataset.build_prompt(d)} for d in fresh]
    rng.shuffle(rest)
    return first + rest


async def run_mode(url: str, workload: list[dict], use_semshare: bool, concurrency: int, new_tokens: int,
                   tenant: str, timeout_s: float) -> list[dict]:
    queue: asyncio.Queue = asyncio.Queue()
    records: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(total=len(workload), desc=tenant, unit="req", file=sys.stderr, disable=not sys.stderr.isatty())

    async def client(c: httpx.AsyncClient) -> None:
        while True:
            try:
                i, item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"prompt": item["prompt"], "max_new_tokens": new_tokens, "temperature": 0,
                    "use_semshare": use_semshare}
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{url}/v1/generate", json=body, headers={"X-Tenant": tenant})
                status, data = r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else {})
            except httpx.HTTPError as e:
                status, data = 0, {"error": repr(e)}
            rec = {"i": i, "kind": item["kind"], "status": status, "latency_ms": (time.perf_counter() - t0) * 1e3}
            if status == 200:
                rec.update(ttft_ms=data["timing"]["ttft_ms"], cache_hit=data["cache_hit"],
                           prompt_tokens=data["usage"]["prompt_tokens"], reused_tokens=data["usage"]["reused_tokens"],
                           replica=data.get("replica"), cache_tier=data.get("cache_tier"),
                           ref_key=data.get("ref_key"))
            records.append(rec)
            bar.update(1)
            bar.set_postfix_str(f"{item['kind']} {status}")

    # two phases: every document's first request completes (its entry registered: a
    # response's store_key is findable once it completes) before the other traffic starts;
    # otherwise a verbatim repeat can race its own first request and miss by timing alone
    first = [(i, item) for i, item in enumerate(workload) if item["kind"] == "first"]
    rest = [(i, item) for i, item in enumerate(workload) if item["kind"] != "first"]
    async with httpx.AsyncClient(timeout=timeout_s) as c:
        for phase in (first, rest):
            for entry in phase:
                queue.put_nowait(entry)
            await asyncio.gather(*(client(c) for _ in range(concurrency)))
    bar.close()
    return sorted(records, key=lambda r: r["i"])


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if r["status"] == 200]
    kinds = sorted({r["kind"] for r in records})
    hits = [r for r in ok if r.get("cache_hit")]
    hot = [r for r in hits if r.get("cache_tier") == "hot"]
    cold = [r for r in hits if r.get("cache_tier") == "cold"]
    return {
        "hits": len(hits), "hot_hits": len(hot),
        "hot_hit_share": round(len(hot) / len(hits), 3) if hits else None,
        "hit_ttft_p50_ms": pct([r["ttft_ms"] for r in hits], 50), "hit_ttft_p99_ms": pct([r["ttft_ms"] for r in hits], 99),
        "hit_ttft_min_ms": min((r["ttft_ms"] for r in hits), default=None),
        "hit_ttft_max_ms": max((r["ttft_ms"] for r in hits), default=None),
        "hot_hit_ttft_p50_ms": pct([r["ttft_ms"] for r in hot], 50),
        "cold_hit_ttft_p50_ms": pct([r["ttft_ms"] for r in cold], 50),
        "replicas_seen": len({r.get("replica") for r in ok if r.get("replica")}),
        "requests": len(records), "ok": len(ok), "non_200": len(records) - len(ok),
        "wall_s": round(wall_s, 2), "requests_per_s": round(len(ok) / wall_s, 3) if wall_s else None,
        "ttft_p50_ms": pct([r["ttft_ms"] for r in ok], 50), "ttft_p99_ms": pct([r["ttft_ms"] for r in ok], 99),
        "latency_p50_ms": pct([r["latency_ms"] for r in ok], 50), "latency_p99_ms": pct([r["latency_ms"] for r in ok], 99),
        "hit_rate": round(sum(r["cache_hit"] for r in ok) / len(ok), 3) if ok else None,
        "reused_share": round(sum(r["reused_tokens"] for r in ok) / max(1, sum(r["prompt_tokens"] for r in ok)), 3),
        "by_kind": {k: {"n": sum(r["kind"] == k for r in ok),
                        "hit_rate": round(statistics.mean([r["cache_hit"] for r in ok if r["kind"] == k] or [0]), 3),
                        "ttft_p50_ms": pct([r["ttft_ms"] for r in ok if r["kind"] == k], 50)} for k in kinds},
    }


def markdown(result: dict) -> str:
    cfg, modes = result["config"], result["modes"]
    lines = [f"# Load benchmark `{result['name']}`", "",
             f"`serve run serve_config.yaml` ({result['server']}), {cfg['concurrency']} concurrent clients, "
             f"{cfg['requests']} requests per mode ({cfg['docs']} documents of ~{cfg['length']} tokens: each sent once, "
             f"{cfg['repeats']} verbatim repeats and {cfg['variants']} edited variants each, plus {cfg['unrelated']} unrelated), "
             f"{cfg['new_tokens']} greedy tokens each, on {result['machine']}. TTFT is the server's (prefill + first token); "
             "latency is the client's (whole request).", "",
             "| mode | ok / sent | req/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | hit rate | reused prompt tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda x: "–" if x is None else f"{x:.0f}"  # noqa: E731
    for mode, s in modes.items():
        lines.append(f"| {mode} | {s['ok']} / {s['requests']} | {s['requests_per_s']:.2f} | {f(s['ttft_p50_ms'])} | "
                     f"{f(s['ttft_p99_ms'])} | {f(s['latency_p50_ms'])} | {f(s['latency_p99_ms'])} | "
                     f"{s['hit_rate']:.2f} | {100 * s['reused_share']:.0f}% |")
    lines += ["", "TTFT p50 by request kind (ms) and hit rate:", "",
              "| mode | " + " | ".join(sorted(next(iter(modes.values()))["by_kind"])) + " |",
              "| --- |" + " ---: |" * len(next(iter(modes.values()))["by_kind"])]
    for mode, s in modes.items():
        cells = [f"{f(v['ttft_p50_ms'])} ({v['hit_rate']:.2f})" for _, v in sorted(s["by_kind"].items())]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine(paths: list[str]) -> str:
    """One markdown table (reuse_on rows) from several result files."""
    lines = ["| run | replicas | affinity | ok / sent | hit rate | hot-hit share | hit TTFT p50 ms | hit TTFT p99 ms | "
             "hit TTFT min..max ms | hot / cold hit TTFT p50 ms | TTFT p50 ms (all) | req/s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda x: "–" if x is None else f"{x:.0f}"  # noqa: E731
    for path in paths:
        res = json.loads(Path(path).read_text())
        cfg = res["config"]
        for mode, s in res["modes"].items():
            if mode != "reuse_on":
                continue
            lines.append(f"| {res['name']} | {cfg.get('replicas') or '?'} | {cfg.get('affinity') or '?'} | "
                         f"{s['ok']} / {s['requests']} | {s['hit_rate']:.2f} | "
                         f"{'–' if s.get('hot_hit_share') is None else format(s['hot_hit_share'], '.2f')} | "
                         f"{f(s.get('hit_ttft_p50_ms'))} | {f(s.get('hit_ttft_p99_ms'))} | "
                         f"{f(s.get('hit_ttft_min_ms'))}..{f(s.get('hit_ttft_max_ms'))} | "
                         f"{f(s.get('hot_hit_ttft_p50_ms'))} / {f(s.get('cold_hit_ttft_p50_ms'))} | "
                         f"{f(s['ttft_p50_ms'])} | {s['requests_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def derived_config(config: str, out: Path, replicas, num_cpus, affinity, port: int, extra: dict | None = None) -> str:
    """``config`` with the app args overridden; written next to the results."""
    doc = yaml.safe_load(Path(config).read_text())
    doc.setdefault("http_options", {})["port"] = port
    args = doc["applications"][0].setdefault("args", {})
    if replicas is not None:
        args["num_replicas"] = replicas
    if num_cpus is not None:
        args["num_cpus"] = num_cpus
    if affinity is not None:
        args["affinity"] = affinity == "on"
    args.update(extra or {})
    path = out / f".load-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def wait_healthy(url: str, timeout_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f}s")


def start_server(config: str, log_path: Path, cores: str | None = None) -> subprocess.Popen:
    """``serve run config``; with ``cores`` (e.g. ``"1"``) under ``taskset -c cores``, so Ray and
    every replica it starts inherit that CPU affinity."""
    serve_bin = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cmd = [serve_bin, "run", config]
    if cores:
        cmd = ["taskset", "-c", cores] + cmd
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def pin_client(cores: str | None) -> None:
    """Pin this process (the client) to ``cores`` ("0", "0,2", "0-3")."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return
    cpus = set()
    for part in cores.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    os.sched_setaffinity(0, cpus)


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--start-server", action="store_true", help="run `serve run <config>` for the duration")
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=None, help="identical repeats per document (onoff: 3, sweep: 1)")
    p.add_argument("--variants", type=int, default=None, help="edited variants per document (onoff: 6, sweep: 2)")
    p.add_argument("--unrelated", type=int, default=4)
    p.add_argument("--concurrency", default=None,
                   help="client counts to sweep, comma-separated (default 1,2,4,8,16; onoff: one value, default 4)")
    p.add_argument("--new-tokens", type=int, default=16, help="onoff only")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file stem (default load-sweep / load-smollm2-cpu)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--replicas", type=int, default=None, help="model replicas (with --start-server)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per model replica (with --start-server)")
    p.add_argument("--affinity", choices=("on", "off"), default=None, help="cache-affinity routing")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another app arg for the started server (YAML value), e.g. hot_tier_bytes=60000000")
    p.add_argument("--modes", nargs="+", choices=("reuse_off", "reuse_on"), default=["reuse_off", "reuse_on"])
    p.add_argument("--combine", nargs="+", default=None, help="onoff result JSON files: write one comparison table")
    # the concurrency sweep
    p.add_argument("--workload", choices=("both", "decode", "reuse", "repeat", "all", "onoff"), default="both",
                   help="decode-heavy and/or reuse sweep; repeat: TTFT of identical repeats; all: both + repeat; "
                        "onoff: reuse on vs off on /v1/generate")
    p.add_argument("--label", default=None, help="name of the target in tables (default: semshare, or the url)")
    p.add_argument("--model", default=None, help="model id to send (default: the first GET /v1/models lists)")
    p.add_argument("--decode-tokens", type=int, default=100, help="decode-heavy prompt length (tokens)")
    p.add_argument("--decode-new-tokens", type=int, default=128)
    p.add_argument("--decode-per-client", type=int, default=2, help="decode requests per client per level")
    p.add_argument("--decode-min", type=int, default=8, help="at least this many decode requests per level")
    p.add_argument("--reuse-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="reuse follow-ups per client per level")
    p.add_argument("--families-min", type=int, default=2, help="at least this many reuse families per level")
    p.add_argument("--repeat-lengths", default="1024,2048", help="repeat mode: prompt lengths (tokens)")
    p.add_argument("--repeat-n", type=int, default=5, help="repeat mode: fresh prompts per length")
    p.add_argument("--repeat-new-tokens", type=int, default=8)
    p.add_argument("--tenant", default="load-sweep", help="X-Tenant header (our server; others ignore it)")
    p.add_argument("--no-salt", action="store_true", help="send no per-level cache_salt")
    p.add_argument("--run-id", default=None, help="salt prefix (default: r<unix time>)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM honours it; our server ignores it)")
    p.add_argument("--server-cores", default="1", help="--start-server: taskset cores of `serve run` ('' = no pin)")
    p.add_argument("--client-cores", default="0", help="CPU affinity of this client process ('' = no pin)")
    p.add_argument("--torch-threads", type=int, default=1, help="--start-server (sweep): the replica's torch_threads")
    p.add_argument("--server-note", default=None, help="how the --url server was started (written to the results)")
    p.add_argument("--compare", nargs=2, metavar=("OURS_JSON", "PEER_JSON"), default=None,
                   help="sweep results side by side: one markdown table (ratios ours / peer)")
    a = p.parse_args(argv)
    if a.compare:
        from . import sweep_report

        md = sweep_report.combine_files(*a.compare)
        out = Path(a.out_dir)
        (out / f"{a.name or 'load-compare'}.md").write_text(md)
        print(md)
        return 0
    if a.workload != "onoff" and not a.combine:
        a.concurrency = a.concurrency or "1,2,4,8,16"
        return sweep_main(p, a)
    a.name = a.name or "load-smollm2-cpu"
    a.repeats = 3 if a.repeats is None else a.repeats
    a.variants = 6 if a.variants is None else a.variants
    conc = [int(x) for x in str(a.concurrency or "4").split(",") if x.strip()]
    if len(conc) != 1:
        p.error("--workload onoff runs one concurrency: pass e.g. --concurrency 4")
    a.concurrency = conc[0]
    if a.combine:
        table = combine(a.combine)
        out = Path(a.out_dir)
        (out / f"{a.name}.md").write_text(f"# Load benchmark: {a.name}\n\n" + table)
        print(table)
        return 0
    extra = {}
    for kv in a.arg:
        k, _, v = kv.partition("=")
        extra[k] = yaml.safe_load(v)
    if (a.replicas or a.num_cpus or a.affinity or extra) and not a.start_server:
        p.error("--replicas / --num-cpus / --affinity / --arg configure the server: use them with --start-server")
    host = httpx.URL(a.url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the load benchmark only targets loopback addresses")

    from semshare_core.models import load_smollm2

    tok = load_smollm2().tokenizer  # the workload is cut in the served model's tokens
    workload = build_workload(a.docs, a.length, a.repeats, a.variants, a.unrelated, a.seed,
                              lambda s: len(tok(s)["input_ids"]))
    proc, startup_s, config = None, None, a.config
    if a.start_server:
        config = a.config
        if a.replicas or a.num_cpus or a.affinity or extra:
            config = derived_config(a.config, Path(a.out_dir), a.replicas, a.num_cpus, a.affinity,
                                    httpx.URL(a.url).port or 8000, extra)
        proc = start_server(config, Path(a.out_dir) / f"{a.name}.server.log")
    try:
        startup_s = wait_healthy(a.url, 600 if a.start_server else 10)
        modes = {}
        run_id = int(time.time())
        for mode, use in (("reuse_off", False), ("reuse_on", True)):
            if mode not in a.modes:
                continue
            t0 = time.perf_counter()
            recs = asyncio.run(run_mode(a.url, workload, use, a.concurrency, a.new_tokens, f"load-{mode}-{run_id}",
                                        a.timeout_s))
            modes[mode] = summarize(recs, time.perf_counter() - t0)
            modes[mode]["records"] = recs
            print(json.dumps({mode: {k: v for k, v in modes[mode].items() if k != "records"}}), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
            if config != a.config:
                Path(config).unlink(missing_ok=True)
    result = {"name": a.name, "server": f"started by the benchmark, healthy after {startup_s:.0f} s" if a.start_server else a.url,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "config": {**{k: v for k, v in vars(a).items() if k not in ("out_dir",)}, "requests": len(workload)},
              "modes": modes}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{a.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(m["non_200"] == 0 for m in modes.values()) else 1


def sweep_main(p: argparse.ArgumentParser, a) -> int:
    """The concurrency sweep (``--workload decode|reuse|both|repeat|all``)."""
    from . import sweep

    a.name = a.name or "load-sweep"
    a.repeats = 1 if a.repeats is None else a.repeats
    a.variants = 2 if a.variants is None else a.variants
    host = httpx.URL(a.url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the load benchmark only targets loopback addresses")
    if (a.replicas or a.num_cpus or a.affinity or a.arg) and not a.start_server:
        p.error("--replicas / --num-cpus / --affinity / --arg configure the server: use them with --start-server")
    a.label = a.label or ("semshare" if a.start_server else a.url)
    pin_client(a.client_cores)
    from transformers import AutoTokenizer

    from semshare_core.models import SMOLLM2_CACHE_NAME, default_cache_dir, load_smollm2

    folder = default_cache_dir() / SMOLLM2_CACHE_NAME
    if not (folder / "tokenizer.json").exists():
        load_smollm2()
    tok = AutoTokenizer.from_pretrained(str(folder))  # prompts are cut in the served model's tokens
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    proc, config, note = None, a.config, a.server_note or "started outside the benchmark"
    if a.start_server:
        extra = {"torch_threads": a.torch_threads}
        for kv in a.arg:
            k, _, v = kv.partition("=")
            extra[k] = yaml.safe_load(v)
        config = derived_config(a.config, Path(a.out_dir), a.replicas, a.num_cpus, a.affinity,
                                httpx.URL(a.url).port or 8000, extra)
        proc = start_server(config, Path(a.out_dir) / f"{a.name}.server.log", a.server_cores or None)
        note = (f"`serve run {a.config}` started by the benchmark"
                + (f" under `taskset -c {a.server_cores}`" if a.server_cores else "")
                + f", app args overridden: {extra}")
    try:
        startup = wait_healthy(a.url, 600 if a.start_server else 10)
        if a.start_server:
            note += f"; healthy after {startup:.0f} s"
        result = sweep.run(a, count, a.url, note)
    finally:
        if proc is not None:
            stop_server(proc)
            Path(config).unlink(missing_ok=True)
    bad = sum(s["non_200"] for lv in result["workloads"].values() for s in lv.values())
    bad += sum(v["failed"] for v in (result.get("repeat") or {}).values())
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
