"""RAG-shaped prompts through HTTP: several-source hits on a running server against full prefills.

    python -m benchmarks.rag_http --url http://127.0.0.1:8000 [--lengths 2048] [--sources 3 4]
                                  [--prompts 2] [--facts 1] [--out rag-http-smollm2-cpu]

The prompts are :mod:`benchmarks.rag`'s (same builder, same seed): the cached prompts are
registered first (``/v1/generate``, one token each, under a fresh ``cache_salt``), then
every new prompt (passages drawn from 2-4 cached prompts + a new question) is sent twice on
the native route, greedy, ``--new-tokens`` tokens:

* ``full``: ``use_semshare: false`` (no lookup, no registration: a plain prefill);
* ``multi``: reuse on (the server looks up, picks its sources, prefills, registers).

The two alternate in order from one prompt to the next. A hit cannot be repeated (its
prompt is registered, so a second send replays it), so each prompt gives ONE timing pair:
the speedup is the median over prompts of the server's own TTFT ratio ``full / multi``
(``timing.ttft_ms``, which excludes the HTTP hops), with the client's TTFT ratio beside
it. Quality over HTTP is greedy text only (no logits): the first generated token the same
(the texts re-tokenised with the server's tokenizer), the share of the tokens equal before
the first divergence, and on fact-edit prompts whether the answer states the new code
(correct) or the cached one (stale). Reuse per prompt: ``usage.reused_tokens`` and the
sources the server used (``usage.sources``).

Writes ``benchmarks/results/<out>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

from . import rag
from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"


def _tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from semshare_core.models import SMOLLM2_CACHE_NAME, default_cache_dir

    return AutoTokenizer.from_pretrained(path or str(default_cache_dir() / SMOLLM2_CACHE_NAME))


def chat_prompt(tok, text: str) -> str:
    """The user message as the raw prompt the chat template makes (what benchmarks.rag encodes)."""
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def post(client: httpx.Client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/generate", json=body)
    wall = (time.perf_counter() - t0) * 1e3
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    out = r.json()
    out["client_ms"] = wall
    return out


def summarize(rows: list[dict]) -> dict:
    def med(xs):
        return round(statistics.median(xs), 3) if xs else None

    def spread(xs):
        return [round(min(xs), 3), round(max(xs), 3)] if xs else None

    sp = [r["speedup_server"] for r in rows if r["speedup_server"]]
    rag_rows = [r for r in rows if r["kind"] == "rag"]
    fact_rows = [r for r in rows if r["kind"] == "fact"]
    return {
        "prompts": len(rows), "hits": sum(r["hit"] for r in rows),
        "speedup_server_median": med(sp), "speedup_server_range": spread(sp),
        "speedup_client_median": med([r["speedup_client"] for r in rows]),
        "reused_share_median": med([r["reused_share"] for r in rows]),
        "sources_used_median": med([r["sources_used"] for r in rows]),
        "first_token_same": f"{sum(r['first_same'] for r in rag_rows)}/{len(rag_rows)}",
        "greedy_prefix_median": med([r["prefix_share"] for r in rag_rows]),
        "facts_correct": f"{sum(r['fact_correct'] for r in fact_rows)}/{len(fact_rows)}",
        "facts_stale": f"{sum(r['fact_stale'] for r in fact_rows)}/{len(fact_rows)}",
        "facts_full_correct": f"{sum(r['fact_full_correct'] for r in fact_rows)}/{len(fact_rows)}",
    }


def markdown(res: dict) -> str:
    lines = [f"# RAG prompts through HTTP `{res['name']}`", "",
             f"Server {res['url']} (`{res['model']}`), {res['conditions']}. Prompts: `benchmarks.rag`'s builder "
             f"(seed {res['seed']}), {res['cached']} cached prompts registered first, then each new prompt sent with "
             "reuse off (`full`) and on (`multi`), greedy, order alternating. One timing pair per prompt (a hit "
             "cannot be repeated: its prompt is registered). Speedup = server TTFT full / multi "
             "(`timing.ttft_ms`); quality = greedy text (first token, share of tokens equal before the first "
             "divergence), facts = the answer states the new code.", "",
             "| length | sources | prompts | hits | speedup (server TTFT) median (min-max) | latency ratio (client, 32 tokens) | "
             "reused share | sources used | first token same | greedy prefix | facts correct / stale (full) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for g in res["groups"]:
        s = g["summary"]
        rng = s["speedup_server_range"]
        lines.append(f"| {g['length']} | {g['sources']} | {s['prompts']} | {s['hits']} | "
                     f"{s['speedup_server_median']}x ({rng[0]}-{rng[1]}) | {s['speedup_client_median']}x | "
                     f"{s['reused_share_median']} | {s['sources_used_median']} | {s['first_token_same']} | "
                     f"{s['greedy_prefix_median']} | {s['facts_correct']} / {s['facts_stale']} "
                     f"({s['facts_full_correct']}) |")
    s = res["summary"]
    lines += ["", f"All prompts: speedup median {s['speedup_server_median']}x (range {s['speedup_server_range']}), "
              f"reused share {s['reused_share_median']}, first token {s['first_token_same']}, greedy prefix "
              f"{s['greedy_prefix_median']}, facts {s['facts_correct']} correct / {s['facts_stale']} stale "
              f"(full prefill: {s['facts_full_correct']}).", "",
              "| prompt | length | sources | kind | n | hit | used | reused | full TTFT ms | multi TTFT ms | "
              "speedup | first same | prefix |", "| ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | "
              "---: | ---: | --- | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['prompt']} | {r['length']} | {r['sources']} | {r['kind']} | {r['n_tokens']} | "
                     f"{r['hit']} | {r['sources_used']} | {r['reused_share']:.2f} | {r['full_ttft_ms']:.0f} | "
                     f"{r['multi_ttft_ms']:.0f} | {r['speedup_server']:.2f} | {r['first_same']} | "
                     f"{r['prefix_share']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rag_http", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048])
    ap.add_argument("--sources", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--prompts", type=int, default=2, help="RAG prompts per (length, sources)")
    ap.add_argument("--facts", type=int, default=1, help="fact-edit prompts per (length, sources)")
    ap.add_argument("--entries", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the SmolLM2 folder load_smollm2 writes)")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--out", default="rag-http-smollm2-cpu")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)

    tok = _tokenizer(a.tokenizer)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def ids_of(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    data = rag.build(a.lengths, a.sources, a.prompts, a.facts, a.entries, a.seed, count)
    salt = f"raghttp-{int(time.time())}-{random.randrange(1 << 30)}"
    load0 = list(os.getloadavg())
    client = httpx.Client(timeout=a.timeout_s)
    model = (client.get(f"{a.url}/v1/models").json().get("data") or [{}])[0].get("id")
    base = {"temperature": 0.0, "cache_salt": salt}
    t0 = time.perf_counter()
    for e in data["cached"]:
        post(client, a.url, {**base, "prompt": chat_prompt(tok, e["text"]), "max_new_tokens": 1})
    print(f"registered {len(data['cached'])} cached prompts in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)

    order = list(range(len(data["new"])))
    random.Random(f"raghttp:{a.seed}").shuffle(order)
    rows = []
    for turn, pi in enumerate(order):
        item = data["new"][pi]
        prompt = chat_prompt(tok, item["text"])
        body = {**base, "prompt": prompt, "max_new_tokens": a.new_tokens}
        runs = {}
        for name in (("full", "multi") if turn % 2 == 0 else ("multi", "full")):
            runs[name] = post(client, a.url, {**body, "use_semshare": name == "multi"})
        full, multi = runs["full"], runs["multi"]
        ft, mt = ids_of(full["text"]), ids_of(multi["text"])
        u = multi["usage"]
        used = [s for s in (u.get("sources") or []) if not s.get("dropped")]
        change = item["change"]
        row = {"prompt": pi, "length": item["length"], "sources": item["sources"], "kind": item["kind"],
               "n_tokens": u["prompt_tokens"], "hit": bool(multi["cache_hit"]),
               "sources_used": len(used) if used else (1 if multi["cache_hit"] else 0),
               "reused_share": u["reused_tokens"] / max(1, u["prompt_tokens"]),
               "full_ttft_ms": full["timing"]["ttft_ms"], "multi_ttft_ms": multi["timing"]["ttft_ms"],
               "speedup_server": full["timing"]["ttft_ms"] / max(1e-6, multi["timing"]["ttft_ms"]),
               "speedup_client": round(full["client_ms"] / max(1e-6, multi["client_ms"]), 3),
               "first_same": bool(ft and mt and ft[0] == mt[0]),
               "prefix_share": common_prefix(ft, mt) / max(1, min(len(ft), a.new_tokens)),
               "fact_correct": bool(change and change.new in multi["text"]),
               "fact_stale": bool(change and change.old in multi["text"]),
               "fact_full_correct": bool(change and change.new in full["text"]),
               "multi_sources": u.get("sources"), "full_timing": full["timing"], "multi_timing": multi["timing"],
               "full_text": full["text"], "multi_text": multi["text"]}
        rows.append(row)
        print(f"[{turn + 1}/{len(order)}] {item['length']} x{item['sources']} {item['kind']}: hit={row['hit']} "
              f"used={row['sources_used']} reused={row['reused_share']:.2f} speedup={row['speedup_server']:.2f}x "
              f"first_same={row['first_same']}", file=sys.stderr, flush=True)
    groups = []
    for L in a.lengths:
        for s in a.sources:
            g = [r for r in rows if r["length"] == L and r["sources"] == s]
            if g:
                groups.append({"length": L, "sources": s, "summary": summarize(g)})
    res = {"name": a.out, "url": a.url, "model": model, "seed": a.seed, "cached": len(data["cached"]),
           "conditions": f"client on {platform.machine()}, load average before {load0}, after "
                         f"{list(os.getloadavg())}",
           "groups": groups, "summary": summarize(rows), "rows": rows}
    save(a.out_dir, a.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
