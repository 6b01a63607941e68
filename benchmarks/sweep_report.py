"""Summaries and markdown tables of the concurrency sweep (pure functions, no server)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from .load import pct

WORKLOAD_LABEL = {"decode": "decode-heavy", "reuse": "reuse"}


def _r(x, nd=2):
    return None if x is None else round(x, nd)


def summarize_level(records: list[dict], wall_s: float) -> dict:
    """One workload at one concurrency: throughput, latency percentiles, cache use."""
    ok = [r for r in records if r["status"] == 200]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    itl = [x for r in ok for x in r.get("itl_ms", [])]
    chunks = sum(r.get("chunks", 0) for r in ok)
    known = [r for r in ok if "cache_hit" in r]
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    kinds = sorted({r.get("kind", "") for r in records})
    by_kind = {}
    for k in kinds:
        rs = [r for r in ok if r.get("kind", "") == k]
        kk = [r for r in rs if "cache_hit" in r]
        kp = sum(r.get("prompt_tokens") or 0 for r in rs)
        by_kind[k] = {"n": len(rs),
                      "hit_rate": _r(sum(r["cache_hit"] for r in kk) / len(kk), 3) if kk else None,
                      "cached_share": _r(sum(r.get("cached_tokens") or 0 for r in rs) / kp, 3) if kp else None,
                      "ttft_p50_ms": _r(pct([r["ttft_ms"] for r in rs if r["ttft_ms"] is not None], 50))}
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    return {
        "requests": len(records), "ok": len(ok), "non_200": len(records) - len(ok),
        "wall_s": _r(wall_s, 3), "output_tokens": tokens,
        "tokens_per_s": _r(tokens / wall_s) if wall_s > 0 else None,
        "requests_per_s": _r(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_p50_ms": _r(pct(ttft, 50)), "ttft_p99_ms": _r(pct(ttft, 99)),
        "itl_p50_ms": _r(pct(itl, 50)), "itl_p99_ms": _r(pct(itl, 99)),
        "latency_p50_ms": _r(pct([r["latency_ms"] for r in ok], 50)),
        "latency_p99_ms": _r(pct([r["latency_ms"] for r in ok], 99)),
        "tokens_per_chunk": _r(tokens / chunks, 3) if chunks else None,
        "hit_rate": _r(sum(r["cache_hit"] for r in known) / len(known), 3) if known else None,
        "cached_share": _r(cached / prompt, 3) if prompt else None,
        "prompt_tokens_mean": _r(prompt / len(ok), 1) if ok else None,
        "by_kind": by_kind,
    }


def add_scaling(levels: dict) -> dict:
    """``tokens_per_s_vs_1``: each level's tokens/s over the 1-client (lowest level) figure."""
    if not levels:
        return levels
    base_c = min(levels, key=int)
    base = levels[base_c].get("tokens_per_s")
    for s in levels.values():
        s["tokens_per_s_vs_1"] = _r(s["tokens_per_s"] / base, 3) if base and s.get("tokens_per_s") is not None else None
        s["scaling_base_concurrency"] = int(base_c)
    return levels


def summarize_repeat(pairs: list[dict]) -> dict:
    """``pairs``: ``{"length", "first": record, "repeat": record}``; per length: the first and the
    identical repeat's TTFT, median and min..max, and the repeat's cached tokens."""
    out = {}
    for n in sorted({p["length"] for p in pairs}):
        ps = [p for p in pairs if p["length"] == n and p["first"]["status"] == 200 and p["repeat"]["status"] == 200]
        def stats(xs):
            xs = [x for x in xs if x is not None]
            return {"median": _r(statistics.median(xs)) if xs else None, "min": _r(min(xs, default=None)),
                    "max": _r(max(xs, default=None)), "n": len(xs)}
        first = stats([p["first"]["ttft_ms"] for p in ps])
        rep = stats([p["repeat"]["ttft_ms"] for p in ps])
        out[str(n)] = {
            "pairs": len(ps), "failed": sum(1 for p in pairs if p["length"] == n) - len(ps),
            "prompt_tokens": stats([p["first"].get("prompt_tokens") for p in ps]),
            "first_ttft_ms": first, "repeat_ttft_ms": rep,
            "repeat_cached_tokens": stats([p["repeat"].get("cached_tokens") for p in ps]),
            "repeat_hits": sum(1 for p in ps if p["repeat"].get("cache_hit")),
            "first_over_repeat_median": _r(first["median"] / rep["median"]) if first["median"] and rep["median"] else None,
        }
    return out


def _f(x, nd=0):
    if x is None:
        return "–"
    return f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Load sweep `{result['name']}`", "",
             f"Target: {result['target']['label']} at {result['target']['url']} (model `{result['target']['model']}`). "
             f"Client: `/v1/completions`, `stream: true`, greedy, on {result['conditions']['machine']}.", ""]
    cond = result["conditions"]
    lines += [f"Conditions: load average before {cond.get('loadavg_before')}, after {cond.get('loadavg_after')} "
              f"(1/5/15 min; the box is shared). Client pinned to cores {cond.get('client_cores')}; "
              f"server: {cond.get('server_note', 'as started outside the benchmark')}.", ""]
    lines += [f"Workloads: decode-heavy = ~{cfg['decode_tokens']}-token unique prompts, {cfg['decode_new_tokens']} new "
              f"tokens, max({cfg['decode_min']}, {cfg['decode_per_client']} x clients) requests per level; reuse = "
              f"families of ~{cfg['reuse_tokens']}-token documents ({cfg['variants']} variants with 10-30 % of sentences "
              f"replaced + {cfg['repeats']} identical repeats each; the references complete before the follow-ups), "
              f"{cfg['reuse_new_tokens']} new tokens. Every level uses fresh documents and its own `cache_salt` "
              f"({'sent' if cfg.get('salt') else 'not sent'}), so no level reuses another's cache.", ""]
    for note in result.get("notes") or []:
        lines += [f"Note: {note}", ""]
    lines += ["TTFT = request sent to first non-empty text chunk; ITL = gap between text chunks per token; "
              "tokens/s = completion tokens of the level / its wall time; x1 = tokens/s over the 1-client level. "
              "Hit rate: our server's `semshare.cache_hit`, a peer's `cached_tokens > 0`; cached = cached prompt "
              "tokens / prompt tokens.", ""]
    lines += ["| workload | clients | ok / sent | tok/s | x1 | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
              "latency p50 | latency p99 | hit rate | follow-up hit rate | cached | prompt tokens (mean) | non-200 | "
              "load avg 1 min before..after |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for wl, levels in result["workloads"].items():
        for c in sorted(levels, key=int):
            s = levels[c]
            fk = [v for k, v in s["by_kind"].items() if k in ("variant", "repeat") and v["n"]]
            fu = None
            if fk and all(v["hit_rate"] is not None for v in fk):
                fu = sum(v["hit_rate"] * v["n"] for v in fk) / sum(v["n"] for v in fk)
            lines.append(
                f"| {WORKLOAD_LABEL.get(wl, wl)} | {c} | {s['ok']} / {s['requests']} | {_f(s['tokens_per_s'], 1)} | "
                f"{_f(s.get('tokens_per_s_vs_1'), 2)} | {_f(s['requests_per_s'], 2)} | {_f(s['ttft_p50_ms'])} | "
                f"{_f(s['ttft_p99_ms'])} | {_f(s['itl_p50_ms'], 1)} | {_f(s['itl_p99_ms'], 1)} | "
                f"{_f(s['latency_p50_ms'])} | {_f(s['latency_p99_ms'])} | {_f(s['hit_rate'], 2)} | {_f(fu, 2)} | "
                f"{_f(s['cached_share'], 2)} | {_f(s.get('prompt_tokens_mean'))} | {s['non_200']} | "
                f"{_f((s.get('loadavg_before') or [None])[0], 1)}..{_f((s.get('loadavg_after') or [None])[0], 1)} |")
    lines.append("")
    lines.append("Times in ms.")
    reuse = result["workloads"].get("reuse")
    if reuse:
        kinds = ("reference", "variant", "repeat")
        lines += ["", "Reuse levels by request kind: n, TTFT p50 ms, hit rate, cached share:", "",
                  "| clients | " + " | ".join(kinds) + " |", "| ---: |" + " ---: |" * len(kinds)]
        for c in sorted(reuse, key=int):
            bk = reuse[c]["by_kind"]
            cells = []
            for k in kinds:
                v = bk.get(k)
                cells.append("–" if not v else f"{v['n']}, {_f(v['ttft_p50_ms'])}, {_f(v['hit_rate'], 2)}, "
                                                f"{_f(v['cached_share'], 2)}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if result.get("repeat"):
        lines += ["", "## Identical repeat: TTFT of a prompt sent once, then again verbatim (sequential, fresh prompts)",
                  "", "| prompt | pairs | prompt tokens (median) | first TTFT median (min..max) ms | "
                  "repeat TTFT median (min..max) ms | first / repeat | repeat cached tokens (median) | repeat hits |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for n, s in result["repeat"].items():
            fr, rp = s["first_ttft_ms"], s["repeat_ttft_ms"]
            lines.append(f"| ~{n} tokens | {s['pairs']} | {_f(s['prompt_tokens']['median'])} | "
                         f"{_f(fr['median'])} ({_f(fr['min'])}..{_f(fr['max'])}) | "
                         f"{_f(rp['median'])} ({_f(rp['min'])}..{_f(rp['max'])}) | {_f(s['first_over_repeat_median'], 2)} | "
                         f"{_f(s['repeat_cached_tokens']['median'])} | {s['repeat_hits']} / {s['pairs']} |")
    return "\n".join(lines) + "\n"


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def combine_table(ours: dict, peer: dict) -> str:
    """Ours and a peer side by side: rows workload x clients; ratios are ours / peer."""
    a, b = ours["target"]["label"], peer["target"]["label"]
    head = ["workload", "clients",
            f"tok/s {a}", f"tok/s {b}", "tok/s ratio",
            f"req/s {a}", f"req/s {b}",
            f"TTFT p50 {a}", f"TTFT p50 {b}", "TTFT p50 ratio",
            f"TTFT p99 {a}", f"TTFT p99 {b}",
            f"ITL p50 {a}", f"ITL p50 {b}", "ITL p50 ratio",
            f"ITL p99 {a}", f"ITL p99 {b}",
            f"hit rate {a}", f"hit rate {b}"]
    lines = [f"Ratios are {a} / {b}. Times in ms.", "",
             "| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    wls = list(dict.fromkeys(list(ours["workloads"]) + list(peer["workloads"])))
    for wl in wls:
        la, lb = ours["workloads"].get(wl, {}), peer["workloads"].get(wl, {})
        for c in sorted(set(la) | set(lb), key=int):
            x, y = la.get(c, {}), lb.get(c, {})
            g = lambda s, k: s.get(k)  # noqa: E731
            cells = [WORKLOAD_LABEL.get(wl, wl), str(c),
                     _f(g(x, "tokens_per_s"), 1), _f(g(y, "tokens_per_s"), 1),
                     _f(_ratio(g(x, "tokens_per_s"), g(y, "tokens_per_s")), 2),
                     _f(g(x, "requests_per_s"), 2), _f(g(y, "requests_per_s"), 2),
                     _f(g(x, "ttft_p50_ms")), _f(g(y, "ttft_p50_ms")),
                     _f(_ratio(g(x, "ttft_p50_ms"), g(y, "ttft_p50_ms")), 2),
                     _f(g(x, "ttft_p99_ms")), _f(g(y, "ttft_p99_ms")),
                     _f(g(x, "itl_p50_ms"), 1), _f(g(y, "itl_p50_ms"), 1),
                     _f(_ratio(g(x, "itl_p50_ms"), g(y, "itl_p50_ms")), 2),
                     _f(g(x, "itl_p99_ms"), 1), _f(g(y, "itl_p99_ms"), 1),
                     _f(g(x, "hit_rate"), 2), _f(g(y, "hit_rate"), 2)]
            lines.append("| " + " | ".join(cells) + " |")
    if ours.get("repeat") or peer.get("repeat"):
        lines += ["", "Identical repeat, TTFT median (min..max) ms:", "",
                  f"| prompt | first {a} | repeat {a} | first {b} | repeat {b} |", "| --- | ---: | ---: | ---: | ---: |"]
        for n in sorted(set(ours.get("repeat", {})) | set(peer.get("repeat", {})), key=int):
            def cell(res, which):
                s = res.get("repeat", {}).get(n)
                if not s:
                    return "–"
                t = s[which]
                return f"{_f(t['median'])} ({_f(t['min'])}..{_f(t['max'])})"
            lines.append(f"| ~{n} tokens | {cell(ours, 'first_ttft_ms')} | {cell(ours, 'repeat_ttft_ms')} | "
                         f"{cell(peer, 'first_ttft_ms')} | {cell(peer, 'repeat_ttft_ms')} |")
    return "\n".join(lines) + "\n"


def combine_files(ours_path: str, peer_path: str) -> str:
    ours, peer = (json.loads(Path(p).read_text()) for p in (ours_path, peer_path))
    cond = []
    for res in (ours, peer):
        c = res.get("conditions", {})
        per = "; ".join(f"{WORKLOAD_LABEL.get(wl, wl)} x{k}: {_f((s.get('loadavg_before') or [None])[0], 1)}.."
                        f"{_f((s.get('loadavg_after') or [None])[0], 1)}"
                        for wl, lv in res.get("workloads", {}).items() for k, s in sorted(lv.items(), key=lambda x: int(x[0])))
        cond.append(f"* {res['target']['label']} ({res['name']}.json, {c.get('started_utc', '?')}): load average "
                    f"before {c.get('loadavg_before')}, after {c.get('loadavg_after')}"
                    + (f"; 1-min load per level: {per}" if per else "") + ".")
    return (f"# {ours['name']} vs {peer['name']}\n\n"
            "Conditions (the 2-core box is shared; compare ratios only between runs of similar load):\n\n"
            + "\n".join(cond) + "\n\n" + combine_table(ours, peer))
