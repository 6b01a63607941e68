"""What the serving reuse path costs around the engine, at ~1k and ~2k tokens (SmolLM2).

    python -m benchmarks.reuse_costs [--lengths 1024 2048] [--reps 5]

In one process with a local Ray (one index actor), for a document of each length and
a 20%-edited variant:

* **registration**: export the prefill's KV (``engine.export_kv``), its device copy
  (a view on the CPU), and the index actor's ``register`` RPC (argument shipped through
  the object store, then ``ray.put`` by the actor, which must own it);
* **cold fetch**: ``await ref`` (same node: zero-copy), the validation
  (:func:`serve_app.kvcheck.load_reference`), the conversion to the engine device;
* **hot hit**: the replica-local tier's ``get`` (what replaces the three above);
* the hit's prefill with the hot (device) KV vs a full prefill, for scale.

Prints a JSON summary (median and min..max over ``reps``) and writes
``benchmarks/results/reuse-costs-<device>.json`` / ``.md``.
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

RESULTS = Path(__file__).resolve().parent / "results"


def _stat(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "n": len(xs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reuse_costs")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)

    import ray
    import torch

    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2
    from serve_app.hot_tier import HotEntry, HotTier, device_kv
    from serve_app.index_actor import IndexActor
    from serve_app.kvcheck import load_reference

    from . import dataset

    torch.set_num_threads(a.threads)
    lm = load_smollm2(device=a.device)
    eng = SemShareEngine(lm.model, lm.tokenizer)
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    out: dict = {"device": a.device, "threads": a.threads, "reps": a.reps, "lengths": {}}
    try:
        index = IndexActor.options(name="reuse_costs_index").remote(eng.config.fingerprint_dim, 64, 8 << 30)
        ray.get(index.ping.remote())
        pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
        for length in a.lengths:
            doc = dataset.make_documents(1, length, count, seed=length)[0]
            prompt = dataset.build_prompt(doc)
            variant = dataset.build_prompt(dataset.edit_sentences(doc, "replace", 0.2, random.Random(1), pool))
            ids, vids = eng.encode(prompt), eng.encode(variant)
            vec = eng.fingerprint(ids)
            r: dict = {k: [] for k in ("full_prefill_ms", "export_ms", "device_copy_ms", "register_rpc_ms",
                                       "register_total_ms", "fetch_ms", "validate_ms", "convert_ms", "cold_total_ms",
                                       "hot_get_ms", "hit_prefill_hot_ms", "hit_prefill_host_ms")}
            for rep in range(a.reps):
                t0 = time.perf_counter()
                pre = eng.prefill(ids)
                t1 = time.perf_counter()
                packed = eng.export_kv(pre)
                t2 = time.perf_counter()
                kv = device_kv(packed, eng.device, eng.dtype)
                t3 = time.perf_counter()
                res = ray.get(index.register.remote(f"t:k{length}-{rep}", vec, ids, packed, "t", 0, True, "r1",
                                                    f"u{rep}"))
                t4 = time.perf_counter()
                assert res["stored"], res
                r["full_prefill_ms"].append((t1 - t0) * 1e3)
                r["export_ms"].append((t2 - t1) * 1e3)
                r["device_copy_ms"].append((t3 - t2) * 1e3)
                r["register_rpc_ms"].append((t4 - t3) * 1e3)
                r["register_total_ms"].append((t4 - t1) * 1e3)
                hit = ray.get(index.lookup.remote(eng.fingerprint(vids), "t", 0.3))
                t5 = time.perf_counter()
                obj = ray.get(hit.refs[0])
                t6 = time.perf_counter()
                checked = load_reference(obj, eng.signature, hit.ref_token_count)
                t7 = time.perf_counter()
                ckv = device_kv(checked, eng.device, eng.dtype)
                t8 = time.perf_counter()
                r["fetch_ms"].append((t6 - t5) * 1e3)
                r["validate_ms"].append((t7 - t6) * 1e3)
                r["convert_ms"].append((t8 - t7) * 1e3)
                r["cold_total_ms"].append((t8 - t5) * 1e3)
                tier = HotTier(8 << 30)
                tier.put(HotEntry(hit.uid, hit.key, checked, ckv, checked.nbytes, 0, True))
                t9 = time.perf_counter()
                e = tier.get(hit.uid)
                t10 = time.perf_counter()
                r["hot_get_ms"].append((t10 - t9) * 1e3)
                t11 = time.perf_counter()
                hp = eng.prefill(vids, e.packed, reference_kv=e.kv)
                t12 = time.perf_counter()
                eng.prefill(vids, checked)
                t13 = time.perf_counter()
                assert hp.stats.hit
                r["hit_prefill_hot_ms"].append((t12 - t11) * 1e3)
                r["hit_prefill_host_ms"].append((t13 - t12) * 1e3)
                del obj, checked, ckv, e, hit, kv, packed, pre
            summary = {k: _stat(v) for k, v in r.items()}
            summary["tokens"] = int(ids.size)
            summary["variant_tokens"] = int(vids.size)
            summary["kv_mb"] = round(eng.export_kv(eng.prefill(ids)).nbytes / 2**20, 2)
            out["lengths"][str(length)] = summary
            print(json.dumps({length: {k: (v["median"] if isinstance(v, dict) else v) for k, v in summary.items()}}),
                  flush=True)
    finally:
        ray.shutdown()
    out["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = f"reuse-costs-{a.device}"
    (d / f"{name}.json").write_text(json.dumps(out, indent=1))
    rows = ["full_prefill_ms", "export_ms", "device_copy_ms", "register_rpc_ms", "register_total_ms", "fetch_ms",
            "validate_ms", "convert_ms", "cold_total_ms", "hot_get_ms", "hit_prefill_hot_ms", "hit_prefill_host_ms"]
    lines = [f"# Reuse-path costs, SmolLM2-135M bf16 on {a.device} ({a.threads} torch thread(s), {out['machine']})",
             "", f"Median (min..max) over {a.reps} repetitions, milliseconds.", "",
             "| stage | " + " | ".join(f"{v['tokens']} tokens ({v['kv_mb']} MB KV)" for v in out["lengths"].values())
             + " |", "| --- |" + " ---: |" * len(out["lengths"])]
    for k in rows:
        lines.append(f"| {k} | " + " | ".join(f"{v[k]['median']:.2f} ({v[k]['min']:.2f}..{v[k]['max']:.2f})"
                                             for v in out["lengths"].values()) + " |")
    (d / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
