"""Index actor under load: lookup latency while clients register long prompts.

    python -m benchmarks.index_load --label after            # appends to results/index-load.json
    python -m benchmarks.index_load --label before --duration 20 --clients 4 --tokens 2048

One local Ray instance (loopback, 2 CPUs). ``--clients`` threads each register, back to
back, a random packed KV of ``--tokens`` tokens in the SmolLM2 shape (30 layers, 3 KV
heads, head_dim 64, bf16: ~23 MB per 1k tokens) with ``IndexActor.register`` (the actor
``ray.put``s it, as in serving: it must own the object); each client's KV is put in the
object store once by the driver and passed by reference, as a replica's argument would
be (back to back, or with ``--register-interval-ms`` between a client's calls). Meanwhile one thread calls ``IndexActor.lookup`` every ``--interval-ms`` and records
its round-trip latency (a Ray actor call from the driver, like the ingress's). A lookup
that takes longer than ``--timeout-s`` (the server's ``lookup_timeout_s``, 2 s) would be
a miss in serving: counted as ``timed_out``.

Writes ``benchmarks/results/index-load.json`` (one record per ``--label``, replaced when
run again) and ``index-load.md`` (a table of every recorded label).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _signature():
    from semshare_core import ModelSignature

    return ModelSignature(architecture="LlamaForCausalLM", num_layers=30, num_kv_heads=3, head_dim=64,
                          hidden_size=576, vocab_size=49152, rope="{}", weights="bench" + "0" * 11)


def random_packed(tokens: int, seed: int):
    from semshare_core import PackedKV

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1 << 16, size=(30, 2, 3, tokens, 64), dtype=np.uint16)
    return PackedKV(data, "bfloat16", rng.integers(0, 49152, tokens, dtype=np.int64), _signature())


def _unit(rng, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run(args) -> dict:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=args.object_store_mb << 20)
    try:
        dim = 4096
        if args.actor == "sync":  # the actor before issue 16: one call at a time, ray.put inline
            from serve_app.index_actor import KVIndex

            cls = ray.remote(num_cpus=0, max_concurrency=1)(KVIndex)
            actor = cls.remote(dim, 1024, args.index_max_mb << 20)
        else:
            from serve_app.index_actor import IndexActor

            actor = IndexActor.remote(dim, 1024, args.index_max_mb << 20, put_threads=args.put_threads)
        ray.get(actor.ping.remote())
        rng = np.random.default_rng(0)
        # a few entries so lookups search something (and some hit)
        small = random_packed(64, 99)
        vecs = [_unit(rng, dim) for _ in range(32)]
        ray.get([actor.register.remote(f"bench:seed{i}", v, small.token_ids, small, "bench")
                 for i, v in enumerate(vecs)])
        packs = [random_packed(args.tokens, c) for c in range(args.clients)]
        kv_refs, kv_nbytes = [ray.put(p) for p in packs], [p.nbytes for p in packs]
        del packs
        kv_ids = [random_packed(8, c).token_ids for c in range(args.clients)]
        nbytes = 30 * 2 * 3 * args.tokens * 64 * 2

        def lookups(seconds: float) -> list[float]:
            out, end = [], time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < end:
                v = vecs[i % len(vecs)] if i % 2 else _unit(rng, dim)
                t0 = time.perf_counter()
                ray.get(actor.lookup.remote(v, "bench", 0.5))
                out.append((time.perf_counter() - t0) * 1e3)
                i += 1
                time.sleep(args.interval_ms / 1e3)
            return out

        load_before = os.getloadavg()
        idle = lookups(min(5.0, args.duration / 2))
        stop = threading.Event()
        reg_ms: list[float] = []

        owner = None
        if args.via == "owner":  # serving's default: the node's KV owner puts, the index gets the ref
            from serve_app.kv_owner import get_or_create_kv_owner

            owner = get_or_create_kv_owner("bench-index", ray.get_runtime_context().namespace,
                                           ray.get_runtime_context().get_node_id())
            ray.get(owner.node_id.remote())

        def client(c: int) -> None:
            crng = np.random.default_rng(100 + c)
            k = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                key, vec = f"bench:c{c}-{k % 8}", _unit(crng, dim)
                if owner is None:
                    ray.get(actor.register.remote(key, vec, kv_ids[c], kv_refs[c], "bench"))
                else:
                    refs = owner.put.remote(kv_refs[c])  # as serving does: the index call waits for the put
                    ray.get(actor.register_ref.remote(key, vec, kv_ids[c], refs, kv_nbytes[c], True, "bench"))
                reg_ms.append((time.perf_counter() - t0) * 1e3)
                k += 1
                if args.register_interval_ms:
                    stop.wait(args.register_interval_ms / 1e3)

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # registrations in flight
        t0 = time.perf_counter()
        loaded = lookups(args.duration)
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(timeout=60)
        stats = ray.get(actor.stats.remote())
        return {
            "label": args.label, "clients": args.clients, "tokens": args.tokens,
            "register_interval_ms": args.register_interval_ms, "actor": args.actor, "via": args.via,
            "put_threads": args.put_threads,
            "kv_mb_per_registration": round(nbytes / 2**20, 1), "duration_s": round(wall, 1),
            "interval_ms": args.interval_ms, "timeout_s": args.timeout_s,
            "idle": {"lookups": len(idle), "p50_ms": round(pct(idle, 50), 2), "p99_ms": round(pct(idle, 99), 2)},
            "loaded": {"lookups": len(loaded), "p50_ms": round(pct(loaded, 50), 2),
                       "p99_ms": round(pct(loaded, 99), 2), "max_ms": round(max(loaded), 2),
                       "timed_out": sum(x > args.timeout_s * 1e3 for x in loaded)},
            "registrations": {"count": len(reg_ms), "per_s": round(len(reg_ms) / wall, 2),
                              "p50_ms": round(pct(reg_ms, 50), 1), "p99_ms": round(pct(reg_ms, 99), 1)},
            "index": {"entries": stats["entries"], "evictions": stats["evictions"]},
            # the box is shared: 1-minute load average before and after the run (2 CPUs)
            "loadavg_1m": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        ray.shutdown()


def write(record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "index-load.json"
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[record["label"]] = record
    path.write_text(json.dumps(runs, indent=2) + "\n")
    lines = ["# Index actor: lookup latency while clients register long prompts", "",
             "`python -m benchmarks.index_load --label <label>` (benchmarks/index_load.py): one local Ray (2 CPUs), "
             "random KV in the SmolLM2 shape, each registration `ray.put` by the actor. Lookup round trips from "
             "the driver, one every `interval_ms`.", "",
             "| label | clients x tokens (MB each), pause |  lookups idle p50 / p99 ms | under load p50 / p99 / max ms | "
             "lookups > timeout | registrations/s (p50 ms) | load avg 1m |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs.values():
        i, l, g = r["idle"], r["loaded"], r["registrations"]
        pause = r.get("register_interval_ms") or 0
        lines.append(f"| {r['label']} | {r['clients']} x {r['tokens']} ({r['kv_mb_per_registration']}), "
                     f"{f'{pause:g} ms' if pause else 'back to back'} | "
                     f"{i['p50_ms']} / {i['p99_ms']} | {l['p50_ms']} / {l['p99_ms']} / {l['max_ms']} | "
                     f"{l['timed_out']} of {l['lookups']} | {g['per_s']} ({g['p50_ms']}) | "
                     f"{' -> '.join(map(str, r.get('loadavg_1m') or ['?']))} |")
    (RESULTS / "index-load.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--actor", choices=["async", "sync"], default="async",
                   help="async: serve_app's IndexActor; sync: the previous one-call-at-a-time actor")
    p.add_argument("--via", choices=["index", "owner"], default="index",
                   help="index: the index actor puts each KV (register); owner: a KVOwner actor puts it and the "
                        "index gets the ref (register_ref: serving's kv_owner node, chosen by auto when the index is on "
                        "another node)")
    p.add_argument("--put-threads", type=int, default=None, help="async actor: concurrent ray.put copies")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--interval-ms", type=float, default=5.0, help="pause between lookups")
    p.add_argument("--register-interval-ms", type=float, default=0.0,
                   help="pause after each registration, per client (0: back to back)")
    p.add_argument("--timeout-s", type=float, default=2.0)
    p.add_argument("--index-max-mb", type=int, default=1024)
    p.add_argument("--object-store-mb", type=int, default=3072)
    args = p.parse_args(argv)
    record = run(args)
    write(record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
