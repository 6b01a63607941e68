"""Acceptance smoke test of `serve run serve_config.yaml` on the embedded model (loopback).

    python -m benchmarks.serve_smoke            # starts the server, prints one JSON line per length

For each length (~1k, ~2k tokens): a prompt is sent with reuse on (miss, registered), the
same prompt again (hit: exact replay), the same with ``use_semshare: false`` (full prefill),
then a variant with 20 % of its sentences replaced (selective-recompute hit) and that
variant with reuse off. Reports hit flags, reused tokens, server TTFTs and whether the
replayed text equals the full prefill's. Exits 1 if an expectation fails.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import httpx

from . import dataset
from .load import RESULTS, start_server, stop_server, wait_healthy

URL = "http://127.0.0.1:8000"


def _gen(prompt: str, **kw) -> dict:
    r = httpx.post(f"{URL}/v1/generate", json={"prompt": prompt, "max_new_tokens": 32, "temperature": 0, **kw},
                   timeout=600)
    r.raise_for_status()
    return r.json()


def main() -> int:
    from semshare_core.models import load_smollm2

    tok = load_smollm2().tokenizer
    count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    pool = [s for sents in dataset._topic_sentences()[-40:] for s in sents]
    proc = start_server("serve_config.yaml", Path(RESULTS) / "serve_smoke.server.log")
    ok = True
    try:
        print(json.dumps({"startup_s": round(wait_healthy(URL, 600), 1)}), flush=True)
        for length, seed in ((1000, 3), (2000, 11)):
            doc = dataset.make_documents(1, length, count, seed=seed)[0]
            prompt = dataset.build_prompt(doc)
            variant = dataset.build_prompt(dataset.edit_sentences(doc, "replace", 0.2, random.Random(1), pool))
            first, again, off = _gen(prompt), _gen(prompt), _gen(prompt, use_semshare=False)
            var, var_off = _gen(variant), _gen(variant, use_semshare=False)
            row = {"length": length, "prompt_tokens": first["usage"]["prompt_tokens"],
                   "full_ttft_ms": off["timing"]["ttft_ms"],
                   "repeat": {"hit": again["cache_hit"], "reused": again["usage"]["reused_tokens"],
                              "ttft_ms": again["timing"]["ttft_ms"], "same_text_as_full": again["text"] == off["text"]},
                   "variant": {"hit": var["cache_hit"], "similarity": var["retrieved_sim"],
                               "reused": var["usage"]["reused_tokens"], "prompt_tokens": var["usage"]["prompt_tokens"],
                               "ttft_ms": var["timing"]["ttft_ms"], "full_ttft_ms": var_off["timing"]["ttft_ms"]}}
            print(json.dumps(row), flush=True)
            ok &= (not first["cache_hit"] and again["cache_hit"] and again["usage"]["reused_tokens"] > 0
                   and again["text"] == off["text"] and var["cache_hit"]
                   and var["usage"]["reused_tokens"] > var["usage"]["prompt_tokens"] / 2)
        rss = subprocess.run("ps -eo rss,args | grep -E 'ray::|raylet|gcs_server|serve run' | grep -v grep "
                             "| awk '{s+=$1} END {print s/1024}'", shell=True, capture_output=True, text=True).stdout
        print(json.dumps({"ray_serve_rss_mb": float(rss or 0)}), flush=True)
    finally:
        stop_server(proc)
    print("OK" if ok else "FAILED: see the rows above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
