"""RAG-shaped prompts: passages cached in *other* combinations, reused from several entries.

    python -m benchmarks.rag [--lengths 1024 2048] [--sources 2 3 4] [--prompts 2] [--reps 5]
                             [--facts 2] [--variants near0 boundary16 ...] [--out NAME]

Built offline from the project's corpus (:mod:`benchmarks.dataset`: CPython's
``pydoc_data.topics``):

* **passages**: consecutive sentences of one topic, ~120 words each;
* **cached prompts** (the index's entries): a chat user message "instruction + P passages
  + question", P = 6 at ~1k tokens, 12 at ~2k; every passage belongs to one cached prompt;
  one passage of each carries a fact sentence ("The access code of the Lyon depot is 4711.");
* **new prompts**: P passages drawn from ``s`` different cached prompts (``s`` = 2, 3, 4;
  about P/s from each, in shuffled order) + a new question. **Fact-edit** prompts contain a
  fact passage whose code was changed and ask for it; correct = the answer states the new
  code, stale = the cached one.

Per new prompt, in one process, the same prompt goes through: ``full`` (plain prefill),
``single`` (today: :meth:`SemanticIndex.lookup` top-1 -> :meth:`SemShareEngine.prefill`
with that reference, a full prefill on a miss) and ``multi``
(:meth:`SemanticIndex.lookup_sources` -> :meth:`SemShareEngine.prefill_multi`), plus any
``--variants`` of multi (config overrides, quality only unless ``--time-variants``), and
``full:chunked`` (quality only, ``--floor-chunk``): the full prefill in chunks, as a served
miss runs it; the same math with other bf16 rounding, so its quality is the metrics' floor.
Reported: coverage of the prompt's distinct 3-grams by any entry / the single entry / the
chosen sources; reused share; FLOP proxy (rows computed incl. probe / n x layers); speedup
full/method as the median of per-round ratios over ``reps`` interleaved rounds (each round
runs every timed method once in a seeded shuffled order); quality teacher-forced on the
full prefill's ``--new-tokens`` (default 32) greedy tokens (per-step top-1 agreement, first token, perplexity ratio).
Writes ``benchmarks/results/<out>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import dataset, facts, metrics
from .methods import HeadInput, flop_proxy, fork, greedy_answer, teacher_force, top2_margin

RESULTS = Path(__file__).resolve().parent / "results"
INSTRUCTION = "Answer the question using the documents below."
CACHED_QUESTIONS = ("What are the key points of these documents?", "Summarize what these documents have in common.",
                    "Which document is the most technical, and why?")
NEW_QUESTIONS = ("Which of these documents explains an error or exception?",
                 "List one key point of each document.", "What do the first and the last document have in common?",
                 "Which document would you read first to learn the basics?")
VARIANTS = {  # name -> SemShareConfig overrides of the multi method
    "near0": {"source_near": 0},
    "near4": {"source_near": 4},
    "near16": {"source_near": 16},
    "near64": {"source_near": 64},
    "near100k": {"source_near": 100000},
    "boundary0": {"boundary_rows": 0},
    "boundary8": {"boundary_rows": 8},
    "boundary16": {"boundary_rows": 16},
    "boundary32": {"boundary_rows": 32},
    "r0.2": {"recompute_ratio": 0.2},
    "r0.4": {"recompute_ratio": 0.4},
    "min64": {"recompute_min_tokens": 64},
    "sfloor0.05": {"source_recompute_floor": 0.05},  # the floor of one reference (before 2026-11-30c)
    "sfloor0.15": {"source_recompute_floor": 0.15},
}


# dataset -------------------------------------------------------------------------------
def make_passages(count: int, words: int = 120, seed: int = 0) -> list[str]:
    """``count`` passages of about ``words`` words (consecutive sentences of one topic)."""
    topics = dataset._topic_sentences()
    order = list(range(len(topics)))
    random.Random(f"rag:{seed}").shuffle(order)
    out = []
    for t in order:
        cur: list[str] = []
        for s in topics[t]:
            cur.append(s)
            if sum(len(x.split()) for x in cur) >= words:
                out.append(" ".join(cur))
                cur = []
                if len(out) == count:
                    return out
    raise ValueError(f"only {len(out)} passages of {words} words")


def render(passages: list[str], question: str) -> str:
    docs = "\n\n".join(f"Document {i + 1}: {p}" for i, p in enumerate(passages))
    return f"{INSTRUCTION}\n\n{docs}\n\nQuestion: {question}"


def with_fact(passage: str, city: str, code: str) -> str:
    """The passage with a fact sentence after its first sentence."""
    sents = dataset.split_sentences(passage)
    fact = facts.SENTENCES["code"].format(city=city, value=code)
    return " ".join(sents[:1] + [fact] + sents[1:])


def build(lengths: list[int], sources: list[int], prompts: int, n_facts: int, entries: int, seed: int,
          count_tokens, per_length: dict | None = None) -> dict:
    """Cached prompts (per length) and new prompts; all seeded. ``per_length``: optional
    ``{length: {"sources": [...], "prompts": k, "facts": k}}`` overriding the global plan."""
    rng = random.Random(f"rag:{seed}")
    sample = make_passages(20, seed=seed + 99)
    per_passage = statistics.mean(count_tokens(f"Document 1: {p}") + 2 for p in sample)
    overhead = count_tokens(render([], CACHED_QUESTIONS[0])) + 8
    plan = {L: max(2, round((L - overhead) / per_passage)) for L in lengths}
    pool = make_passages(sum(plan[L] * entries for L in lengths), seed=seed)
    cities = list(facts.CITIES)
    rng.shuffle(cities)
    out = {"cached": [], "new": [], "per_passage_tokens": per_passage, "passages_per_prompt": plan}
    at = 0
    for L in lengths:
        P = plan[L]
        group = []
        for e in range(entries):
            ps = pool[at:at + P]
            at += P
            city = cities.pop()
            code = str(rng.randrange(2100, 10000))
            fi = rng.randrange(P)
            ps = list(ps)
            plain = ps[fi]
            ps[fi] = with_fact(plain, city, code)
            entry = {"length": L, "key": f"{L}-{e}", "passages": ps, "fact": {"index": fi, "city": city, "code": code,
                                                                               "plain": plain},
                     "text": render(ps, CACHED_QUESTIONS[e % len(CACHED_QUESTIONS)])}
            group.append(entry)
            out["cached"].append(entry)
        over = (per_length or {}).get(L, {})
        for s in over.get("sources", sources):
            if s > entries:
                continue
            n_rag = over.get("prompts", prompts)
            for k in range(n_rag + over.get("facts", n_facts)):
                fact_prompt = k >= n_rag
                chosen = rng.sample(range(entries), s)
                counts = [P // s + (1 if i < P % s else 0) for i in range(s)]
                picked = []  # (entry, passage index)
                for c, e in zip(counts, chosen):
                    idx = rng.sample(range(P), min(c, P))
                    if fact_prompt and e == chosen[0] and group[e]["fact"]["index"] not in idx:
                        idx[0] = group[e]["fact"]["index"]
                    picked += [(e, i) for i in idx]
                rng.shuffle(picked)
                texts, change = [], None
                for e, i in picked:
                    ent = group[e]
                    if fact_prompt and e == chosen[0] and i == ent["fact"]["index"]:
                        old = ent["fact"]["code"]
                        new = old
                        while new == old:
                            new = str(rng.randrange(2100, 10000))
                        texts.append(with_fact(ent["fact"]["plain"], ent["fact"]["city"], new))
                        change = facts.FactChange(ent["fact"]["city"], "code", old, new)
                    else:
                        texts.append(ent["passages"][i])
                q = (facts.QUESTIONS["code"].format(city=change.city) if change
                     else NEW_QUESTIONS[k % len(NEW_QUESTIONS)])
                out["new"].append({"length": L, "sources": s, "kind": "fact" if change else "rag",
                                   "from": [group[e]["key"] for e in chosen], "text": render(texts, q),
                                   "change": change})
    return out


# measurement ---------------------------------------------------------------------------
def parse_variant(v: str) -> dict:
    """A named variant (:data:`VARIANTS`) or ``field=value[,field=value]`` (JSON values, else strings)."""
    if v in VARIANTS:
        return dict(VARIANTS[v])
    out = {}
    for part in v.split(","):
        key, _, val = part.partition("=")
        if not _:
            raise SystemExit(f"variant {v!r}: expected a name from {sorted(VARIANTS)} or field=value pairs")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def coverage(ids: np.ndarray, others: list[np.ndarray], n: int = 3) -> float:
    from semshare_core.fingerprint import ngram_hashes

    p = np.unique(ngram_hashes(ids, n))
    if p.size == 0 or not others:
        return 0.0
    union = np.unique(np.concatenate([np.unique(ngram_hashes(o, n)) for o in others]))
    return float(np.isin(p, union).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rag")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--sources", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--prompts", type=int, default=2, help="RAG prompts per (length, sources)")
    ap.add_argument("--facts", type=int, default=1, help="fact-edit prompts per (length, sources)")
    ap.add_argument("--entries", type=int, default=8, help="cached prompts per length (all in the index)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=20,
                    help="greedy tokens of a fact-edit answer (a 4-digit code comes ~16 tokens in)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help=f"named ({', '.join(sorted(VARIANTS))}) or field=value[,field=value] overrides of multi")
    ap.add_argument("--time-variants", action="store_true")
    ap.add_argument("--floor-chunk", type=int, default=512,
                    help="quality-only method 'full:chunked': the full prefill in chunks of this many tokens "
                         "(what a served miss runs; the same math, other bf16 rounding): the numerical floor of "
                         "the quality metrics (0 = off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile-prefill", choices=("off", "on", "auto"), default="off",
                    help="the engine's compile_prefill: full prefills and hits' layers compiled (the server's "
                         "default is auto = on for bf16 on a CPU); off = the library default, eager")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4, 8, 16], help="top-k values for the retrieval table")
    ap.add_argument("--config", default="{}", help="JSON SemShareConfig overrides for single and multi")
    ap.add_argument("--plan", default="{}", help='JSON per length, e.g. {"2048": {"sources": [3, 4], "prompts": 2, '
                    '"facts": 1}} (overrides --sources/--prompts/--facts there)')
    ap.add_argument("--out", default="rag-smollm2-cpu")
    a = ap.parse_args(argv)
    if a.reps < 5:
        print("note: fewer than 5 timed rounds", file=sys.stderr)

    from semshare_core import SemanticIndex, SemShareConfig, SemShareEngine
    from semshare_core.models import load_smollm2

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    lm = load_smollm2()
    cfg = SemShareConfig.from_dict({"seed": a.seed, **json.loads(a.config)})
    eng = SemShareEngine(lm.model, lm.tokenizer, cfg, compile_prefill=a.compile_prefill)
    if eng.compiled_prefill is not None:
        print(f"compiled full prefill and hit layers in {eng.warm_compiled_prefill():.0f} s", file=sys.stderr,
              flush=True)
    L_layers = eng.num_layers

    def count(text: str) -> int:
        return len(eng.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(text: str) -> np.ndarray:
        return eng.encode_chat([{"role": "user", "content": text}])

    plan = {int(k): v for k, v in json.loads(a.plan).items()}
    data = build(a.lengths, a.sources, a.prompts, a.facts, a.entries, a.seed, count, plan)
    print(f"passages ~{data['per_passage_tokens']:.0f} tokens, per prompt {data['passages_per_prompt']}; "
          f"{len(data['cached'])} cached, {len(data['new'])} new prompts", file=sys.stderr, flush=True)
    index = SemanticIndex(cfg.fingerprint_dim, max_items=4096, max_bytes=1 << 40)
    cached_ids = {}
    for e in data["cached"]:
        ids = encode(e["text"])
        pre = eng.prefill(ids)
        packed = eng.export_kv(pre)
        del pre
        cached_ids[e["key"]] = ids
        index.add(e["key"], eng.fingerprint(ids), ids, packed.nbytes, packed)
    print(f"cached {len(cached_ids)} prompts in {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)

    head = HeadInput(lm.model)
    shadow = SemanticIndex(cfg.fingerprint_dim, max_items=4096, max_bytes=1 << 40)  # retrieval table only
    for key, cid in cached_ids.items():
        shadow.add(key, eng.fingerprint(cid), cid, 1, key)
    variant_cfgs = {v: cfg.with_(**parse_variant(v)) for v in a.variants}
    timed = ["full", "single", "multi"] + ([f"multi:{v}" for v in a.variants] if a.time_variants else [])
    records, retrieval = [], []
    all_ids = list(cached_ids.values())
    for pi, item in enumerate(data["new"]):
        ids = encode(item["text"])
        n = int(ids.size)
        vec = eng.fingerprint(ids)
        # retrieval table: coverage and sources chosen per k (no side effects on the measured run)
        for k in a.ks:
            t0 = time.perf_counter()
            cov = shadow.lookup_sources(vec, ids, threshold=cfg.sim_threshold, k=k, max_sources=cfg.max_sources,
                                        min_gain=cfg.source_min_gain, min_sim=cfg.source_min_sim, ngram=cfg.ngram)
            ms = (time.perf_counter() - t0) * 1e3
            retrieval.append({"prompt": pi, "length": item["length"], "sources": item["sources"], "k": k,
                              "chosen": [] if cov is None else [m.entry.key for m in cov.matches],
                              "right": 0 if cov is None else len(set(m.entry.key for m in cov.matches) & set(item["from"])),
                              "covered": 0.0 if cov is None else cov.covered, "lookup_ms": ms})
        t0 = time.perf_counter()
        top = index.lookup(vec, threshold=cfg.sim_threshold)
        single_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        cov = index.lookup_sources(vec, ids, threshold=cfg.sim_threshold, k=cfg.source_candidates,
                                   max_sources=cfg.max_sources, min_gain=cfg.source_min_gain,
                                   min_sim=cfg.source_min_sim, ngram=cfg.ngram)
        multi_ms = (time.perf_counter() - t0) * 1e3
        single_ref = top.entry.payload if top else None
        multi_refs = [m.entry.payload for m in cov.matches] if cov else []
        common = {"prompt": pi, "length": item["length"], "n_tokens": n, "sources": item["sources"],
                  "kind": item["kind"], "from": item["from"],
                  "coverage_any": coverage(ids, all_ids),
                  "coverage_true": coverage(ids, [cached_ids[k] for k in item["from"]]),
                  "coverage_single": coverage(ids, [cached_ids[top.entry.key]]) if top else 0.0,
                  "coverage_chosen": cov.covered if cov else 0.0,
                  "single_key": top.entry.key if top else None, "single_sim": top.similarity if top else None,
                  "chosen": [m.entry.key for m in cov.matches] if cov else [],
                  "chosen_sims": [m.similarity for m in cov.matches] if cov else [],
                  "lookup_ms": {"single": single_ms, "multi": multi_ms}}

        def run(name):
            if name == "full":
                return eng.prefill(ids)
            if name == "full:chunked":
                return drain(eng.prefill_steps(ids, chunk=a.floor_chunk))
            if name == "single":
                return eng.prefill(ids, single_ref) if single_ref is not None else eng.prefill(ids)
            c = variant_cfgs[name.split(":", 1)[1]] if ":" in name else cfg
            return eng.prefill_multi(ids, multi_refs, c) if multi_refs else eng.prefill(ids)

        names = (["full"] + (["full:chunked"] if a.floor_chunk > 0 else []) + ["single", "multi"]
                 + [f"multi:{v}" for v in a.variants])
        recs, target, nll_full, ans_full = {}, None, None, None
        first32_full, margin_full = None, None
        for name in names:  # warm-up + untimed quality
            head.last = None
            pre = run(name)
            # the same hidden state through a float32 head; None where the head ran inside a compiled
            # graph (--compile-prefill: the full prefill), which its hook cannot see
            first32 = None if head.last is None else int(torch.argmax(head.logits32()))
            if name == "full":
                first32_full, margin_full = first32, top2_margin(pre.logits)
            st = pre.stats
            deep = st.rows_per_layer[1:] or [n]
            rec = {**common, "method": name, "hit": bool(st.hit), "reused_share": st.reused_tokens / n,
                   "mapped_share": (1 - st.mapping.get("none", n) / n) if st.hit else 0.0,
                   "reused_mean": 1 - sum(deep) / (len(deep) * n),
                   "flop_proxy": flop_proxy(st, n, L_layers), "mapping": dict(st.mapping),
                   "rows_layer1": st.rows_per_layer[1] if len(st.rows_per_layer) > 1 else n,
                   "stats_sources": list(getattr(st, "sources", []) or [])}
            if item["change"] is not None and a.answer_tokens > 0:
                ans = greedy_answer(eng, fork(pre), a.answer_tokens)
                text = eng.decode_text(ans)
                rec.update(answer_text=text, **{f"answer_{k}": v for k, v in
                                                facts.score_answer(text, item["change"]).items()})
                if name == "full":
                    ans_full = ans
                rec["answer_same_as_full"] = ans == ans_full
            toks, argmaxes, nll = teacher_force(eng, pre, a.new_tokens, target)
            if name == "full":
                target, nll_full = toks, nll
            rec.update(agreement=metrics.agreement(argmaxes, target), first_token_agree=argmaxes[0] == target[0],
                       full_first_margin=margin_full, ppl_ratio=metrics.ppl_ratio(nll, nll_full, a.new_tokens))
            if first32 is not None and first32_full is not None:
                rec["first_token_agree_fp32"] = first32 == first32_full
            recs[name] = rec
            del pre
        rng = random.Random(f"{a.seed}:{pi}")
        ttft = {m: [] for m in timed}
        cpu = {m: [] for m in timed}
        stages = {m: [] for m in timed}
        for _ in range(a.reps):
            order = list(timed)
            rng.shuffle(order)
            for name in order:
                c0, t0 = time.thread_time(), time.perf_counter()
                pre = run(name)
                int(torch.argmax(pre.logits))
                ttft[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.thread_time() - c0) * 1e3)
                stages[name].append((pre.stats.mapping_ms, pre.stats.gather_ms, pre.stats.prefill_ms))
                del pre
        for name in names:
            if name in ttft and a.reps > 0:
                recs[name].update(ttft_ms=statistics.median(ttft[name]), ttft_rounds=ttft[name],
                                  cpu_ms=statistics.median(cpu[name]),
                                  **{k: statistics.median(x[i] for x in stages[name])
                                     for i, k in enumerate(("mapping_ms", "gather_ms", "prefill_ms"))},
                                  **metrics.speedup_summary(ttft["full"], ttft[name]),
                                  **metrics.speedup_summary(cpu["full"], cpu[name], key="speedup_cpu"))
            records.append(recs[name])
        m = recs["multi"]
        s = recs["single"]
        print(f"[{pi + 1}/{len(data['new'])}] L={item['length']} s={item['sources']} {item['kind']} n={n} "
              f"cov any/single/chosen {common['coverage_any']:.2f}/{common['coverage_single']:.2f}/"
              f"{common['coverage_chosen']:.2f} ({len(common['chosen'])} src) | single {s.get('speedup', 0):.2f}x "
              f"agr {s['agreement']:.2f} ppl {s['ppl_ratio']:.3f} f{int(s['first_token_agree'])} | multi {m.get('speedup', 0):.2f}x "
              f"reused {m['reused_share']:.2f} agr {m['agreement']:.2f} ppl {m['ppl_ratio']:.3f} f{int(m['first_token_agree'])}"
              + "".join(f" | {v} agr {recs['multi:' + v]['agreement']:.2f} ppl {recs['multi:' + v]['ppl_ratio']:.3f} f{int(recs['multi:' + v]['first_token_agree'])}"
                        f" flop {recs['multi:' + v]['flop_proxy']:.2f}" for v in a.variants),
              file=sys.stderr, flush=True)
    result = {"config": {**vars(a), "semshare_config": cfg.to_dict()}, "model": lm.name,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                          "torch": torch.__version__},
              "passages_per_prompt": data["passages_per_prompt"], "per_passage_tokens": data["per_passage_tokens"],
              "records": records, "retrieval": retrieval, "elapsed_s": time.perf_counter() - t_start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"{a.out}.md").write_text(report(result))
    print(report(result))
    return 0


def drain(gen):
    """Run a :meth:`SemShareEngine.prefill_steps` generator to the end: its PrefillResult."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


# report --------------------------------------------------------------------------------
def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def summarize(recs: list[dict]) -> dict:
    sp = [r["speedup"] for r in recs if "speedup" in r]
    rounds = [x for r in recs for x in r.get("speedup_rounds", [])]
    ans = [r for r in recs if "answer_correct" in r]
    spc = [r["speedup_cpu"] for r in recs if "speedup_cpu" in r]
    rounds_c = [x for r in recs for x in r.get("speedup_cpu_rounds", [])]
    return {"prompts": len(recs), "tokens": _med([r["n_tokens"] for r in recs]),
            "speedup_cpu": _med(spc) if spc else None, "speedup_cpu_min": min(rounds_c) if rounds_c else None,
            "speedup_cpu_max": max(rounds_c) if rounds_c else None,
            "mapped": _med([r.get("mapped_share", 0.0) for r in recs]),
            "reused_mean": _med([r.get("reused_mean", 0.0) for r in recs]),
            "stage_ms": tuple(_med([r.get(k) for r in recs]) for k in ("mapping_ms", "gather_ms", "prefill_ms")),
            "hit": sum(r["hit"] for r in recs) / len(recs),
            "reused": _med([r["reused_share"] for r in recs]), "flop": _med([r["flop_proxy"] for r in recs]),
            "speedup": _med(sp) if sp else None, "speedup_min": min(rounds) if rounds else None,
            "speedup_max": max(rounds) if rounds else None,
            "agreement": _med([r["agreement"] for r in recs]),
            "agreement_p10": metrics.quantile([r["agreement"] for r in recs], 0.1),
            "first": sum(bool(r["first_token_agree"]) for r in recs) / len(recs),
            "first_fp32": (sum(bool(r["first_token_agree_fp32"]) for r in recs) / len(recs)
                           if all("first_token_agree_fp32" in r for r in recs) else None),
            "ppl": _med([r["ppl_ratio"] for r in recs]), "ppl_max": max(r["ppl_ratio"] for r in recs),
            "correct": (sum(r["answer_correct"] for r in ans), len(ans)) if ans else None,
            "stale": sum(r["answer_stale"] for r in ans) if ans else None}


def _row(label: str, s: dict) -> str:
    first = f"{s['first']:.0%}" + ("" if s.get("first_fp32") is None else f" / {s['first_fp32']:.0%}")
    sp = "-" if s["speedup"] is None else f"{s['speedup']:.2f}x [{s['speedup_min']:.2f}–{s['speedup_max']:.2f}]"
    spc = ("-" if s["speedup_cpu"] is None else
           f"{s['speedup_cpu']:.2f}x [{s['speedup_cpu_min']:.2f}–{s['speedup_cpu_max']:.2f}]")
    fact = "-" if s["correct"] is None else f"{s['correct'][0]}/{s['correct'][1]} ({s['stale']} stale)"
    return (f"| {label} | {s['prompts']} | {s['tokens']:.0f} | {s['hit']:.0%} | {s['mapped']:.2f} | {s['reused']:.2f} | "
            f"{s['reused_mean']:.2f} | {s['flop']:.2f} | {sp} | {spc} | {s['agreement']:.2f} / {s['agreement_p10']:.2f} | "
            f"{first} | {s['ppl']:.3f} / {s['ppl_max']:.3f} | {fact} |")


HEADER = ("| group | method | prompts | tokens | hit | mapped | reused (layer 1) | reused (mean, layers 1+) | FLOP proxy "
          "| speedup [round range] | CPU-time speedup [range] | agreement med / p10 | first tok (served bf16 head / float32 head) | ppl ratio med / max "
          "| fact correct |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | --- "
          "| --- |")


def report(res: dict) -> str:
    recs = res["records"]
    methods = list(dict.fromkeys(r["method"] for r in recs))
    cfg = res["config"]["semshare_config"]
    lines = [f"# RAG-shaped prompts: one source vs several (`{res['config']['out']}`)", "",
             f"Model **{res['model']}**, bf16, CPU ({res['machine']['cpu']}), {res['machine']['threads']} torch thread, "
             f"torch {res['machine']['torch']}; compile_prefill {res['config'].get('compile_prefill', 'off')} "
             "(on: full prefills and hits' layers compiled, as served). Passages ~{res['per_passage_tokens']:.0f} tokens; passages per prompt "
             f"{res['passages_per_prompt']}; {res['config']['entries']} cached prompts per length in the index. "
             f"Engine config: recompute_ratio {cfg['recompute_ratio']}, max_sources {cfg['max_sources']}, "
             f"source_candidates {cfg['source_candidates']}, source_min_gain {cfg['source_min_gain']}, "
             f"source_near {cfg['source_near']}, boundary_rows {cfg['boundary_rows']}, recompute_floor "
             f"{cfg['recompute_floor']} (several sources: {cfg.get('source_recompute_floor', cfg['recompute_floor'])}). "
             f"{res['config']['reps']} interleaved timed rounds per prompt (full, single, multi"
             + (", variants" if res["config"]["time_variants"] else "") + f"); wall {res['elapsed_s']:.0f} s.", "",
             "single = today (index top-1, one reference; a miss is a full prefill); multi = `lookup_sources` + "
             "`prefill_multi`; `multi:<v>` = multi with a config variant (quality only unless timed). speedup = median "
             "over prompts of each prompt's median per-round full/method ratio, [range] = min–max of all per-round "
             f"ratios. Quality: teacher-forced on the full prefill's {res['config'].get('new_tokens', 32)} greedy tokens. "
             "`full:chunked` (quality "
             "only): the same full prefill in chunks, as a served miss runs it: the same math with other bf16 "
             "rounding, i.e. the metrics' numerical floor.", "",
             "## Coverage of the prompt's distinct 3-grams (median)", "",
             "| length | sources | prompts | any entry | true sources | single (top-1) | chosen (multi) | sources chosen | right sources |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    multi = [r for r in recs if r["method"] == "multi"]
    for L in sorted({r["length"] for r in multi}):
        for s in sorted({r["sources"] for r in multi}):
            g = [r for r in multi if r["length"] == L and r["sources"] == s]
            if not g:
                continue
            lines.append(f"| {L} | {s} | {len(g)} | {_med([r['coverage_any'] for r in g]):.2f} | "
                         f"{_med([r['coverage_true'] for r in g]):.2f} | {_med([r['coverage_single'] for r in g]):.2f} | "
                         f"{_med([r['coverage_chosen'] for r in g]):.2f} | {_med([len(r['chosen']) for r in g]):.0f} | "
                         f"{_med([len(set(r['chosen']) & set(r['from'])) for r in g]):.0f} / {s} |")
    lines += ["", "## Single vs several sources", "", HEADER]
    groups = [("all", lambda r: True)]
    groups += [(f"{L} tokens", (lambda L: lambda r: r["length"] == L)(L)) for L in sorted({r["length"] for r in recs})]
    groups += [(f"{s} sources", (lambda s: lambda r: r["sources"] == s)(s)) for s in sorted({r["sources"] for r in recs})]
    groups += [("target: 2k, 3-4 sources", lambda r: r["length"] >= 1536 and r["sources"] >= 3)]
    groups += [("fact-edit prompts", lambda r: r["kind"] == "fact")]
    for gname, pred in groups:
        for m in methods:
            g = [r for r in recs if r["method"] == m and pred(r)]
            if g:
                lines.append(_row(f"{gname} | {m}", summarize(g)))
    ret = res.get("retrieval") or []
    if ret:
        lines += ["", "## Retrieval: top-k candidates (median over prompts)", "",
                  "| k | sources chosen | right sources / true | covered | lookup ms |", "| ---: | ---: | --- | ---: | ---: |"]
        for k in sorted({r["k"] for r in ret}):
            g = [r for r in ret if r["k"] == k]
            lines.append(f"| {k} | {_med([len(r['chosen']) for r in g]):.1f} | "
                         f"{sum(r['right'] for r in g)} / {sum(r['sources'] for r in g)} | "
                         f"{_med([r['covered'] for r in g]):.3f} | {_med([r['lookup_ms'] for r in g]):.2f} |")
    t = [r for r in recs if r["method"] == "multi" and r["length"] >= 1536 and r["sources"] >= 3]
    if t:
        s = summarize(t)
        checks = [("reused share >= 0.8 (layer-1 rows reused)", s["reused"], s["reused"] >= 0.8),
                  ("reused share >= 0.8 (mean over layers 1+)", s["reused_mean"], s["reused_mean"] >= 0.8),
                  ("reused share >= 0.8 (tokens mapped to a source)", s["mapped"], s["mapped"] >= 0.8),
                  ("median speedup >= 2.5x (wall, shared box)", s["speedup"],
                   s["speedup"] is not None and s["speedup"] >= 2.5),
                  ("median speedup >= 2.5x (CPU time)", s["speedup_cpu"],
                   s["speedup_cpu"] is not None and s["speedup_cpu"] >= 2.5),
                  ("agreement median >= 0.95", s["agreement"], s["agreement"] >= 0.95),
                  ("agreement p10 >= 0.90", s["agreement_p10"], s["agreement_p10"] >= 0.90),
                  ("first token >= 90%", s["first"], s["first"] >= 0.9),
                  ("first token >= 90% (float32 head over the same hidden states)", s["first_fp32"],
                   s["first_fp32"] is not None and s["first_fp32"] >= 0.9),
                  ("ppl ratio median <= 1.02", s["ppl"], s["ppl"] <= 1.02)]
        lines += ["", "## Issue targets (multi, ~2k tokens, 3-4 sources, default config)", "",
                  "| target | measured | holds |", "| --- | ---: | --- |"]
        lines += [f"| {n} | {'-' if v is None else f'{v:.3f}'} | {'yes' if ok else 'NO'} |" for n, v, ok in checks]
    facts_recs = [r for r in recs if "answer_text" in r]
    if facts_recs:
        lines += ["", "## Fact-edit answers", "", "| prompt | length | sources | method | correct | stale | answer |",
                  "| ---: | ---: | ---: | --- | --- | --- | --- |"]
        for r in facts_recs:
            lines.append(f"| {r['prompt']} | {r['length']} | {r['sources']} | {r['method']} | {r['answer_correct']} | "
                         f"{r['answer_stale']} | {json.dumps(r['answer_text'][:40])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
