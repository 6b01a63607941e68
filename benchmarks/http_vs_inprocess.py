"""TTFT ratio (full / hit) of the same engine in-process and through HTTP, one replica.

    python -m benchmarks.http_vs_inprocess [--lengths 1024 2048] [--pairs 3] [--rounds 5]
                                           [--threads 1] [--seed 0] [--port 8019] [--out-dir DIR]

For each length, ``pairs`` documents and a 20%-edited variant of each (SmolLM2). One
server (``serve run`` of serve_config.yaml, 1 replica, started here) and one in-process
engine live side by side for the whole run, built from the SAME app args (the derived
config file: :func:`benchmarks.load.derived_config`): same model / dtype, same
:class:`~semshare_core.SemShareConfig` (``AppArgs.semshare_config()``), and the same
torch thread count (``--threads``: ``torch.set_num_threads`` here, ``torch_threads`` in
the server's args, which the replica applies at start-up).

Per pair, the document is prepared once: in-process its KV is exported; through HTTP it
is registered under a ``store_key`` (so it is hot on the replica). Then, per round, four
measurements in a seeded shuffled order (interleaved, so drift on a shared machine hits
all four alike):

* ``inproc_full``: ``engine.prefill(variant)``;
* ``inproc_hit``: ``engine.prefill(variant, reference=document's KV)``;
* ``http_full``: the variant with reuse off (``use_semshare: false``);
* ``http_hit``: the variant with reuse on; it must be a hit on the document's hot copy
  (``cache_hit``, ``cache_tier == "hot"``, ``ref_key`` = the document's key; asserted and
  recorded). The server runs with ``max_reuse_depth: 0``, ``depth_cap_policy: skip`` so the variant itself is never
  registered: every round's hit reuses the document, as in-process.

HTTP TTFT is the ingress's (request in -> first token out: tokenize, lookup, routing,
hot tier, prefill); in-process it is the prefill. One warm-up round per length (all
pairs, discarded), then ``rounds`` measured rounds. Per length: the median of the
per-round full / hit ratios (one per pair and round) in-process and through HTTP, their
min-max spread, and HTTP median / in-process median (acceptance: >= 0.85).

Writes ``<out-dir>/http-vs-inprocess.json``/``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

from . import dataset
from .load import RESULTS, derived_config, start_server, stop_server, wait_healthy

MEASURES = ("inproc_full", "inproc_hit", "http_full", "http_hit")
ACCEPT = 0.85  # HTTP ratio / in-process ratio at least this (within 15%)


def round_orders(seed: int, rounds: int) -> list[list[str]]:
    """The order of the four measurements in each round (seeded, reproducible)."""
    from .runner import round_orders as shuffled

    return shuffled(list(MEASURES), rounds, random.Random(seed))


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize_rounds(rows: list[dict]) -> dict:
    """Rows: one per (pair, measured round) with the four ``*_ms``. Ratios are per row."""
    inproc = [r["inproc_full_ms"] / r["inproc_hit_ms"] for r in rows]
    http = [r["http_full_ms"] / r["http_hit_ms"] for r in rows]
    s = {"inprocess": {"ratio": spread(inproc), "full_ms": spread([r["inproc_full_ms"] for r in rows]),
                       "hit_ms": spread([r["inproc_hit_ms"] for r in rows])},
         "http": {"ratio": spread(http), "full_ms": spread([r["http_full_ms"] for r in rows]),
                  "hit_ms": spread([r["http_hit_ms"] for r in rows]),
                  "hit_tiers": sorted({r.get("http_hit_tier") for r in rows}, key=str)}}
    s["http_over_inprocess"] = s["http"]["ratio"]["median"] / s["inprocess"]["ratio"]["median"]
    s["accepted"] = s["http_over_inprocess"] >= ACCEPT
    return s


def markdown(out: dict) -> str:
    c = out["config"]
    lines = ["# TTFT ratio full / hit: in-process vs through HTTP (SmolLM2 CPU, 1 replica)", "",
             f"{c['pairs']} document / 20%-edited variant pairs per length, {c['rounds']} interleaved rounds each "
             f"(seeded shuffled order of the four measurements, seed {c['seed']}) after one warm-up round; "
             f"torch threads {c['threads']} in-process and on the replica (Ray worker niceness "
             f"{c.get('ray_worker_niceness', 'default')}); same engine config "
             f"(from `{c['config_source']}`). Ratios: median over the per-round full / hit ratios "
             f"[min - max]; ms: medians. HTTP hits: tier {', '.join(map(str, c.get('hit_tiers', [])))}. "
             f"Machine: {c['machine']}.", "",
             "| tokens | in-process full / hit ms | in-process ratio [min - max] | HTTP full / hit ms "
             "| HTTP ratio [min - max] | HTTP / in-process | >= 0.85 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for length, v in out["lengths"].items():
        s = v["summary"]
        i, h = s["inprocess"], s["http"]
        lines.append(
            f"| ~{length} | {i['full_ms']['median']:.0f} / {i['hit_ms']['median']:.0f} | "
            f"{i['ratio']['median']:.2f} [{i['ratio']['min']:.2f} - {i['ratio']['max']:.2f}] | "
            f"{h['full_ms']['median']:.0f} / {h['hit_ms']['median']:.0f} | "
            f"{h['ratio']['median']:.2f} [{h['ratio']['min']:.2f} - {h['ratio']['max']:.2f}] | "
            f"{s['http_over_inprocess']:.2f} | {'yes' if s['accepted'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_vs_inprocess")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per pair (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and on the replica")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="Ray worker niceness increment for the server (RAY_worker_niceness; Ray's default 15 "
                        "would run the replica at a lower priority than the in-process engine)")
    p.add_argument("--port", type=int, default=8019)
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.rounds < 1 or a.pairs < 1:
        p.error("--rounds and --pairs must be >= 1")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch
    import yaml

    from semshare_core import SemShareEngine
    from serve_app.settings import load_model, resolve_args

    # one source of truth for both sides: the derived config's app args
    cfg = derived_config(a.config, out_dir, 1, None, None, a.port,
                         extra={"torch_threads": a.threads, "max_reuse_depth": 0, "depth_cap_policy": "skip"})
    app_args = yaml.safe_load(Path(cfg).read_text())["applications"][0]["args"]
    args = resolve_args(app_args)
    torch.set_num_threads(a.threads)
    lm = load_model(args)
    eng = SemShareEngine(lm.model, lm.tokenizer, args.semshare_config())
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    cases = {}
    for length in a.lengths:
        docs = dataset.make_documents(a.pairs, length, count, seed=100 + length)
        cases[length] = [(dataset.build_prompt(d),
                          dataset.build_prompt(dataset.edit_sentences(d, "replace", 0.2, random.Random(i), pool)))
                         for i, d in enumerate(docs)]
    run_id = f"{int(time.time())}"
    out = {"config": {"lengths": a.lengths, "pairs": a.pairs, "rounds": a.rounds, "warmup_rounds": 1,
                      "threads": a.threads, "seed": a.seed, "config_source": a.config,
                      "server_args": {k: v for k, v in app_args.items() if k != "semshare"},
                      "engine_config": eng.config.to_dict(), "inprocess_torch_threads": torch.get_num_threads(),
                      "model": args.served_model_name(), "dtype": args.dtype,
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip()},
           "lengths": {}}
    url = f"http://127.0.0.1:{a.port}"
    os.environ["RAY_worker_niceness"] = str(a.worker_niceness)  # for the `serve run` child (its raylet)
    out["config"]["ray_worker_niceness"] = a.worker_niceness
    proc = start_server(cfg, out_dir / "http_vs_inprocess.server.log")
    try:
        wait_healthy(url, 600)
        client = httpx.Client(base_url=url, timeout=600)

        def gen(prompt: str, tenant: str, **kw) -> dict:
            r = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 1, "temperature": 0, **kw},
                            headers={"X-Tenant": tenant})
            r.raise_for_status()
            return r.json()

        for length, pairs in cases.items():
            prepared = []
            for i, (doc, var) in enumerate(pairs):
                tenant, key = f"hvi-{length}-{i}-{run_id}", f"doc{i}"
                ref = eng.export_kv(eng.prefill(eng.encode(doc)))
                reg = gen(doc, tenant, store_key=key)
                assert reg["store_key"] == key, reg
                prepared.append({"tenant": tenant, "key": key, "var": var, "ids": eng.encode(var), "ref": ref})

            def measure(what: str, pp: dict) -> tuple[float, dict]:
                if what == "inproc_full":
                    t0 = time.perf_counter()
                    eng.prefill(pp["ids"])
                    return (time.perf_counter() - t0) * 1e3, {}
                if what == "inproc_hit":
                    t0 = time.perf_counter()
                    pre = eng.prefill(pp["ids"], pp["ref"])
                    ms = (time.perf_counter() - t0) * 1e3
                    assert pre.stats.hit, "in-process reuse was not a hit"
                    return ms, {}
                if what == "http_full":
                    r = gen(pp["var"], pp["tenant"], use_semshare=False)
                    assert not r["cache_hit"], r
                    assert r["usage"]["prompt_tokens"] == pp["ids"].size, (r["usage"], pp["ids"].size)  # same prompt
                    return r["timing"]["ttft_ms"], {}
                r = gen(pp["var"], pp["tenant"])
                extra = {"http_hit_tier": r.get("cache_tier"), "http_ref_key": r.get("ref_key"),
                         "http_cache_hit": r.get("cache_hit")}
                assert r["cache_hit"] and r.get("cache_tier") == "hot" and r.get("ref_key") == pp["key"], \
                    f"the HTTP hit is not a hit on the document's hot copy: {extra}"
                return r["timing"]["ttft_ms"], extra

            orders = round_orders(a.seed * 1_000_003 + length, (1 + a.rounds) * len(prepared))
            rows, warmup = [], []
            for rnd in range(1 + a.rounds):  # round 0: warm-up, discarded
                for i, pp in enumerate(prepared):
                    order = orders[rnd * len(prepared) + i]
                    row = {"round": rnd, "pair": i, "order": order}
                    for what in order:
                        ms, extra = measure(what, pp)
                        row[f"{what}_ms"] = ms
                        row.update(extra)
                    (warmup if rnd == 0 else rows).append(row)
            summary = summarize_rounds(rows)
            out["lengths"][str(length)] = {"tokens": [int(pp["ids"].size) for pp in prepared],
                                           "summary": summary, "rounds": rows, "warmup": warmup}
            print(json.dumps({length: {k: summary[k] for k in ("http_over_inprocess", "accepted")},
                              "inprocess_ratio": summary["inprocess"]["ratio"],
                              "http_ratio": summary["http"]["ratio"]}), flush=True)
        client.close()
    finally:
        stop_server(proc)
        Path(cfg).unlink(missing_ok=True)
    out["config"]["hit_tiers"] = sorted({t for v in out["lengths"].values() for t in v["summary"]["http"]["hit_tiers"]},
                                        key=str)
    (out_dir / "http-vs-inprocess.json").write_text(json.dumps(out, indent=1))
    md = markdown(out)
    (out_dir / "http-vs-inprocess.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
