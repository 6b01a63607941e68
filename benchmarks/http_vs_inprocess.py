"""TTFT ratio (full / hit) of the same engine in-process and through HTTP, one replica.

    python -m benchmarks.http_vs_inprocess [--lengths 1024 2048] [--pairs 3] [--port 8019]

For each length, ``pairs`` documents and a 20%-edited variant of each (SmolLM2):

* in-process: ``engine.prefill(variant)`` vs ``engine.prefill(variant, reference=doc's KV)``;
* through HTTP (``serve run`` of serve_config.yaml with 1 replica, started here): the
  document is sent (registered, hot on the replica), then the variant with reuse off
  (full) and with reuse on (hit); TTFT is the ingress's (request in -> first token out:
  tokenize, lookup, routing, fetch / hot tier, prefill).

Ratio = median(full) / median(hit) per length. Writes ``benchmarks/results/http-vs-inprocess.json``/``.md``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

from . import dataset
from .load import RESULTS, derived_config, start_server, stop_server, wait_healthy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_vs_inprocess")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--port", type=int, default=8019)
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)

    import torch

    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2

    torch.set_num_threads(1)  # as the replica (Ray: OMP_NUM_THREADS = its num_cpus, 1)
    lm = load_smollm2()
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    cases = {}
    for length in a.lengths:
        docs = dataset.make_documents(a.pairs, length, count, seed=100 + length)
        cases[length] = [(dataset.build_prompt(d),
                          dataset.build_prompt(dataset.edit_sentences(d, "replace", 0.2, random.Random(i), pool)))
                         for i, d in enumerate(docs)]
    out = {"lengths": {}}
    eng = SemShareEngine(lm.model, lm.tokenizer)
    for length, pairs in cases.items():
        full, hit = [], []
        for doc, var in pairs:
            ref = eng.export_kv(eng.prefill(eng.encode(doc)))
            ids = eng.encode(var)
            t0 = time.perf_counter()
            eng.prefill(ids)
            t1 = time.perf_counter()
            pre = eng.prefill(ids, ref)
            t2 = time.perf_counter()
            assert pre.stats.hit
            full.append((t1 - t0) * 1e3)
            hit.append((t2 - t1) * 1e3)
        out["lengths"][str(length)] = {"inprocess": {"full_ms": full, "hit_ms": hit,
                                                     "ratio": statistics.median(full) / statistics.median(hit)}}
        print(json.dumps({length: out["lengths"][str(length)]}), flush=True)
    del eng, lm

    url = f"http://127.0.0.1:{a.port}"
    cfg = derived_config("serve_config.yaml", Path(a.out_dir), 1, None, None, a.port)
    proc = start_server(cfg, Path(a.out_dir) / "http_vs_inprocess.server.log")
    try:
        wait_healthy(url, 600)
        for length, pairs in cases.items():
            full, hit, tiers = [], [], []
            for i, (doc, var) in enumerate(pairs):
                tenant = f"hvi-{length}-{i}-{int(time.time())}"

                def gen(prompt, **kw):
                    r = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "max_new_tokens": 1,
                                                               "temperature": 0, **kw},
                                   headers={"X-Tenant": tenant}, timeout=600)
                    r.raise_for_status()
                    return r.json()
                gen(doc)
                f = gen(var, use_semshare=False)
                h = gen(var)
                assert h["cache_hit"], h
                full.append(f["timing"]["ttft_ms"])
                hit.append(h["timing"]["ttft_ms"])
                tiers.append(h.get("cache_tier"))
            out["lengths"][str(length)]["http"] = {"full_ms": full, "hit_ms": hit, "tiers": tiers,
                                                   "ratio": statistics.median(full) / statistics.median(hit)}
            print(json.dumps({length: out["lengths"][str(length)]["http"]}), flush=True)
    finally:
        stop_server(proc)
        Path(cfg).unlink(missing_ok=True)
    d = Path(a.out_dir)
    (d / "http-vs-inprocess.json").write_text(json.dumps(out, indent=1))
    lines = ["# TTFT ratio full / hit: in-process vs through HTTP (SmolLM2 bf16 CPU, 1 replica)", "",
             f"{a.pairs} document / 20%-edited variant pairs per length; medians; one run on a shared 2-core box.", "",
             "| tokens | in-process full / hit ms | ratio | HTTP full / hit ms | ratio | HTTP / in-process |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for length, v in out["lengths"].items():
        i, h = v["inprocess"], v["http"]
        lines.append(f"| ~{length} | {statistics.median(i['full_ms']):.0f} / {statistics.median(i['hit_ms']):.0f} | "
                     f"{i['ratio']:.2f} | {statistics.median(h['full_ms']):.0f} / {statistics.median(h['hit_ms']):.0f} | "
                     f"{h['ratio']:.2f} | {h['ratio'] / i['ratio']:.2f} |")
    (d / "http-vs-inprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
