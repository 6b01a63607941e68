"""The benchmark loop: models, pairs, interleaved timed rounds, untimed quality probes, records.

Per pair (a reference prompt and an edited variant) the reference is prefilled once and
its KV packed (kept as host numpy by default, or as wire bytes, or on the device:
``kv_placement``). Then, for the variant:

1. **Warm-up + quality (untimed).** Every method prefills once, ``full`` first. The full
   prefill's greedy continuation of ``new_tokens`` tokens is the target; each method's
   warm-up prefill is teacher-forced on it (per-step top-1 agreement with the target, the
   NLL -> perplexity ratio to full's, first-token agreement). On fact pairs each method
   also answers greedily (``answer_tokens``) from a copy of the same cache.
2. **Timed rounds.** ``reps`` rounds; in each, every method runs once, in an order shuffled
   by a seeded ``random.Random`` (interleaved, so drifts of the machine hit all methods
   alike). Per method: median TTFT with min/max/IQR over rounds, and the speedup as the
   median (min/max) of the per-round ratios ``full / method``.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from semshare_core.config import SemShareConfig
from semshare_core.engine import SemShareEngine
from semshare_core.fingerprint import similarity
from semshare_core.models import LoadedModel

from . import dataset, facts, metrics
from .methods import (DEFAULT_BLOCK, MethodSpec, Reference, decode_cache_bytes, flop_proxy, fork, greedy_answer,
                      make_reference, method_specs, resolve_config, run_method, teacher_force)

MODELS = ("smollm2", "tiny-random", "llama3-8b-random")
DEFAULT_METHODS = ("full", "prefix", "semshare", "semshare_r0", "semshare_r1", "semshare_pruned")
MIN_REPS = 5


@dataclass
class BenchConfig:
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str | None = None            # default: bfloat16, float32 for tiny-random
    model_shape: str = "full"           # llama3-8b-random only: "full" (8B) or "small" (CPU check)
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    edits: list[str] = field(default_factory=lambda: ["replace", "mixed", "instruction"])
    ratios: list[float] = field(default_factory=lambda: [0.2])
    pairs: int = 1                      # prose documents per length (each gets every edit x ratio)
    fact_pairs: int = 4                 # fact-edit pairs per length
    new_tokens: int = 32                # teacher-forced target length (0: no quality)
    answer_tokens: int = 24             # greedy answer on fact pairs (0: no answers; SmolLM2 spells digits one token each)
    reps: int = MIN_REPS                # timed rounds after the warm-up
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    sweep: dict = field(default_factory=dict)   # name -> SemShareConfig overrides (extra semshare methods)
    base_config: dict = field(default_factory=dict)  # SemShareConfig overrides under every method (default: none)
    pruned_retention: float = 0.5
    memory_length: int | None = None    # default: the middle length
    memory_retentions: list[float] = field(default_factory=lambda: [1.0, 0.5])
    kv_placement: str = "host"
    prefix_block: int = DEFAULT_BLOCK
    budget_s: float | None = 1380.0     # stop starting new pairs after this many seconds
    jsonl: bool = False
    name: str = "bench"
    out_dir: str = "benchmarks/results"
    progress: bool = True
    threads: int | None = None          # torch intra-op threads on CPU (default 1)

    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.model == "tiny-random" else "bfloat16")

    def resolved_threads(self) -> int | None:
        """Threads to set: ``threads``, else 1 on CPU; None (leave torch's) on an accelerator."""
        if self.threads:
            return self.threads
        return 1 if self.device == "cpu" else None

    def all_specs(self) -> dict[str, MethodSpec]:
        return method_specs(self.pruned_retention, self.extra_retentions(), self.sweep)

    def extra_retentions(self) -> tuple[float, ...]:
        return tuple(r for r in self.memory_retentions if r not in (1.0, self.pruned_retention))

    def method_names(self, length: int | None = None, memory_length: int | None = None) -> list[str]:
        """Methods run on a pair of ``length``: full first, then ``methods``, the sweep, and
        the retention sweep at ``memory_length``."""
        names = ["full"] + [m for m in self.methods if m != "full"] + list(self.sweep)
        if length is not None and length == memory_length and "semshare" in self.methods:
            names += [f"semshare_ret{r:g}" for r in self.extra_retentions()]
        return names


def validate(bc: BenchConfig, base: SemShareConfig | None = None) -> dict[str, SemShareConfig]:
    """Every method's resolved config; raises ``ValueError`` (naming the method) on unknown
    methods, unknown config fields or invalid values. Run before the model loads."""
    base = base or SemShareConfig.from_dict({"seed": bc.seed, **bc.base_config})
    specs = bc.all_specs()
    unknown = [m for m in bc.methods if m not in specs]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(specs)}")
    return {name: resolve_config(base, specs[name]) for name in specs}


# models -------------------------------------------------------------------------------
def llama3_8b_random(device: str, dtype: str, shape: str = "full") -> LoadedModel:
    """A Llama-3.1-8B-shaped LlamaForCausalLM with random weights, built on ``device``.

    Speed and memory do not depend on the weights. Token ids come from the offline tiny
    tokenizer (ids < 512 < vocab). ``shape="small"`` keeps the Llama-3 rope and GQA but
    tiny dimensions (CPU check of the code path).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from semshare_core.models import _torch_dtype, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if shape == "full":
        dims = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256)
    elif shape == "small":
        dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024)
    else:
        raise ValueError(f"model_shape must be full or small, got {shape!r}")
    cfg = LlamaConfig(**dims, max_position_embeddings=131072, rope_parameters=rope, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(_torch_dtype(dtype))
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    return LoadedModel(model, tok, "llama3-8b-random" + ("" if shape == "full" else "-small"))


def load_model(bc: BenchConfig) -> LoadedModel:
    from semshare_core import models

    dtype = bc.resolved_dtype()
    if bc.model == "smollm2":
        return models.load_smollm2(dtype=dtype, device=bc.device)
    if bc.model == "tiny-random":
        lm = models.tiny_random("llama", dtype=dtype)
        return LoadedModel(lm.model.to(bc.device), lm.tokenizer, lm.name)
    if bc.model == "llama3-8b-random":
        return llama3_8b_random(bc.device, dtype, bc.model_shape)
    raise ValueError(f"unknown model {bc.model!r}; choose from {MODELS}")


def machine_info(device: str) -> dict:
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        import subprocess

        here = Path(__file__).resolve().parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=here, timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../semshare_core"], capture_output=True,
                               text=True, cwd=here, timeout=5).stdout.strip()
        info["semshare_core_uncommitted_changes"] = bool(dirty)
    except Exception:  # noqa: BLE001 - informational only
        info["git_commit"] = None
    return info


# pairs ----------------------------------------------------------------------------------
def _count_tokens(eng: SemShareEngine):
    def count(text: str) -> int:
        return len(eng.tokenizer(text, add_special_tokens=False)["input_ids"])
    return count


def build_tasks(eng: SemShareEngine, bc: BenchConfig) -> list[tuple[int, object]]:
    """``(nominal length, pair)``: prose pairs (:mod:`dataset`) and fact pairs (:mod:`facts`),
    interleaved over lengths and kinds so a budget cut keeps every length and both kinds."""
    count = _count_tokens(eng)
    overhead = int(eng.encode(dataset.INSTRUCTIONS[1] + "\n\n").size) + 1
    chat_overhead = int(encode_prompt(eng, "x", chat=True).size) if has_chat(eng) else 1
    per_length = []
    for length in bc.lengths:
        prose = []
        if bc.pairs > 0 and bc.edits:
            docs = dataset.make_documents(bc.pairs, max(8, length - overhead), count, seed=bc.seed)
            prose = dataset.make_pairs(docs, bc.edits, bc.ratios, seed=bc.seed)
        fact = facts.make_fact_pairs(bc.fact_pairs, max(8, length - chat_overhead), count, seed=bc.seed)
        mixed = []
        for i in range(max(len(prose), len(fact))):
            mixed += [p for p in (prose[i] if i < len(prose) else None, fact[i] if i < len(fact) else None) if p]
        per_length.append([(length, p) for p in mixed])
    tasks = []
    for i in range(max((len(x) for x in per_length), default=0)):
        tasks.extend(x[i] for x in per_length if i < len(x))
    return tasks


def has_chat(eng: SemShareEngine) -> bool:
    return bool(getattr(eng.tokenizer, "chat_template", None))


def encode_prompt(eng: SemShareEngine, text: str, chat: bool) -> np.ndarray:
    """Fact prompts go through the chat template when the tokenizer has one; prose is plain text."""
    if chat and has_chat(eng):
        return eng.encode_chat([{"role": "user", "content": text}])
    return eng.encode(text)


def pair_source(pair) -> str:
    return getattr(pair, "source", "prose")


def round_orders(names: list[str], reps: int, rng: random.Random) -> list[list[str]]:
    """``reps`` independent shuffles of ``names``: the order of each timed round."""
    orders = []
    for _ in range(reps):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def _text(eng: SemShareEngine, toks: list[int]) -> str:
    vocab = len(eng.tokenizer)
    return eng.decode_text([t for t in toks if t < vocab])


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# one pair -------------------------------------------------------------------------------
def method_record(spec: MethodSpec, cfg: SemShareConfig, pre, n: int, L: int) -> dict:
    """The static part of a method's record, from one of its prefills."""
    st = pre.stats
    rec = {"method": spec.name, "kind": spec.kind, "group": spec.group, "overrides": dict(spec.overrides),
           "recompute_ratio": cfg.recompute_ratio if spec.kind == "semshare" else None,
           "retention": cfg.retention if spec.kind == "semshare" else None,
           "n_tokens": n, "flop_proxy": flop_proxy(st, n, L), "rows_per_layer": list(st.rows_per_layer),
           "probe_rows": int(getattr(st, "probe_rows", 0) or 0), "retained_per_layer": list(st.retained_per_layer),
           "kv_bytes": decode_cache_bytes(pre.cache), "reused_tokens": int(st.reused_tokens),
           "reused_share": st.reused_tokens / n, "recomputed_tokens": int(st.recomputed_tokens),
           "mapping": dict(st.mapping), "hit": bool(st.hit), "first_token": int(torch.argmax(pre.logits)),
           "staging": getattr(st, "staging", "")}
    if spec.kind == "prefix":
        rec["prefix_block"] = None  # filled by the caller
    return rec


def run_pair(eng: SemShareEngine, ids: np.ndarray, ref: Reference, pair, names: list[str],
             specs: dict[str, MethodSpec], cfgs: dict[str, SemShareConfig], bc: BenchConfig,
             rng: random.Random, on_run=None) -> list[dict]:
    """Warm-up + quality, then ``bc.reps`` interleaved timed rounds; one record per method."""
    n, L = int(ids.size), eng.num_layers
    fact = pair if pair_source(pair) == "facts" else None
    k = bc.new_tokens
    recs: dict[str, dict] = {}
    target = nll_full = answer_full = None
    for name in names:  # warm-up run of every method (full first) + untimed quality on its result
        spec = specs[name]
        pre, first, ttft, _ = run_method(eng, ids, ref, spec.kind, cfgs[name], bc.prefix_block)
        rec = method_record(spec, cfgs[name], pre, n, L)
        rec["warmup_ms"] = ttft
        if spec.kind == "prefix":
            rec["prefix_block"] = bc.prefix_block
            rec["common_prefix"] = int(pre.stats.mapping.get("common_prefix", 0))
        if fact is not None and bc.answer_tokens > 0:
            ans = greedy_answer(eng, fork(pre) if k > 0 else pre, bc.answer_tokens)
            text = _text(eng, ans)
            rec.update(answer_ids=ans, answer_text=text, **{f"answer_{key}": v for key, v in
                                                                 facts.score_answer(text, fact.asked).items()})
            if name == "full":
                answer_full = ans
            rec["answer_same_as_full"] = ans == answer_full
        if k > 0:
            toks, argmaxes, nll = teacher_force(eng, pre, k, target)
            if name == "full":
                target, nll_full = toks, nll
            rec.update(target_argmax=argmaxes, nll=nll, ppl=metrics.perplexity(nll, k),
                       agreement=metrics.agreement(argmaxes, target), first_token_agree=argmaxes[0] == target[0],
                       ppl_ratio=metrics.ppl_ratio(nll, nll_full, k))
        if fact is not None:
            rec["fact"] = {"attribute": fact.asked.attribute, "city": fact.asked.city, "old": fact.asked.old,
                           "new": fact.asked.new, "changes": len(fact.changes)}
        recs[name] = rec
        del pre
        if on_run:
            on_run(name, "warm-up")

    orders = round_orders(names, bc.reps, rng)
    ttft = {m: [] for m in names}
    cpu = {m: [] for m in names}
    stages = {m: [] for m in names}
    for r, order in enumerate(orders):
        for name in order:
            pre, first, ms, timings = run_method(eng, ids, ref, specs[name].kind, cfgs[name], bc.prefix_block)
            st = pre.stats
            del pre
            ttft[name].append(ms)
            cpu[name].append(timings["cpu_ms"])
            stages[name].append((timings["fetch_ms"], st.mapping_ms, st.gather_ms, st.prefill_ms))
            if on_run:
                on_run(name, f"round {r + 1}")
    for name in names:
        rec = recs[name]
        sp = metrics.spread(ttft[name])
        rec.update(ttft_ms=sp["median"], ttft_min_ms=sp["min"], ttft_max_ms=sp["max"], ttft_q1_ms=sp["q1"],
                   ttft_q3_ms=sp["q3"], ttft_iqr_ms=sp["iqr"], ttft_ms_rounds=[round(t, 3) for t in ttft[name]],
                   round_positions=[o.index(name) for o in orders],
                   cpu_ms=_median(cpu[name]), **metrics.speedup_summary(ttft["full"], ttft[name]),
                   **metrics.speedup_summary(cpu["full"], cpu[name], key="speedup_cpu"))
        for i, key in enumerate(("fetch_ms", "mapping_ms", "gather_ms", "prefill_ms")):
            rec[key] = _median([s[i] for s in stages[name]])
    return [recs[name] for name in names]


def warm_up(eng: SemShareEngine, bc: BenchConfig) -> None:
    """One full, prefix and SemShare prefill on a short prompt (kernels, lazy inits)."""
    sents = dataset._topic_sentences()[0]
    ids = eng.encode(dataset.build_prompt(sents[:6]))
    ref = make_reference(eng, ids, bc.kv_placement)
    var = ids.copy()
    var[len(var) // 2] = var[len(var) // 2 - 1]  # not identical: no exact replay
    for kind in ("full", "prefix", "semshare"):
        run_method(eng, var, ref, kind, eng.config, bc.prefix_block)


def estimate_s(eng: SemShareEngine, bc: BenchConfig, tasks, mem_len) -> tuple[float, dict]:
    """An upper-bound estimate of the run: every method priced as one full prefill
    (measured once per length here), plus the quality steps (a decode step measured)."""
    per_len = {}
    for length in sorted({l for l, _ in tasks}):
        pair = next(p for l, p in tasks if l == length)
        ids = encode_prompt(eng, pair.variant, chat=pair_source(pair) == "facts")
        t0 = time.perf_counter()
        pre = eng.prefill(ids)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        teacher_force(eng, pre, 4)
        t_step = (time.perf_counter() - t0) / 3
        per_len[length] = (t_full, t_step)
        del pre
    total = 0.0
    for length, pair in tasks:
        t_full, t_step = per_len[length]
        m = len(bc.method_names(length, mem_len))
        steps = bc.new_tokens + (bc.answer_tokens if pair_source(pair) == "facts" else 0)
        total += t_full * (1 + m * (1 + bc.reps)) + m * steps * t_step
    return total, {l: {"full_prefill_s": round(a, 3), "decode_step_s": round(b, 4)} for l, (a, b) in per_len.items()}


# the whole run --------------------------------------------------------------------------
def run(bc: BenchConfig, log=None) -> dict:
    """Run the grid; returns the result dict (config, machine, records) without writing it."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    threads = bc.resolved_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(bc.seed)
    base = SemShareConfig.from_dict({"seed": bc.seed, **bc.base_config})
    cfgs = validate(bc, base)  # before loading the model: a bad sweep fails at once
    specs = bc.all_specs()
    lm = load_model(bc)
    eng = SemShareEngine(lm.model, lm.tokenizer, base)
    load_s = time.perf_counter() - t_start
    mem_len = bc.memory_length or (sorted(bc.lengths)[len(bc.lengths) // 2] if bc.lengths else None)
    warm_up(eng, bc)
    tasks = build_tasks(eng, bc)
    est, calib = estimate_s(eng, bc, tasks, mem_len) if tasks else (0.0, {})
    result = {"config": {**asdict(bc), "dtype": bc.resolved_dtype(), "memory_length": mem_len, "threads": threads,
                         "semshare_config": eng.config.to_dict(),
                         "method_configs": {n: {"kind": specs[n].kind, "group": specs[n].group,
                                                "overrides": dict(specs[n].overrides)} for n in specs},
                         "chat_template": has_chat(eng)},
              "machine": machine_info(bc.device), "model_name": lm.name,
              "model": {"layers": eng.num_layers, "kv_heads": eng.signature.num_kv_heads,
                        "head_dim": eng.signature.head_dim, "hidden": eng.signature.hidden_size,
                        "params": sum(p.numel() for p in lm.model.parameters())},
              "load_s": load_s, "estimate_s": est, "calibration": calib, "records": [], "skipped_pairs": 0}
    print(f"{len(tasks)} pairs x up to {len(bc.method_names(mem_len, mem_len))} methods x (1 warm-up + {bc.reps} "
          f"rounds): estimated <= {est / 60:.1f} min (every method priced as a full prefill)"
          + (f"; budget {bc.budget_s / 60:.1f} min" if bc.budget_s else ""), file=sys.stderr, flush=True)

    def emit(obj: dict) -> None:
        if bc.jsonl:
            slim = {k: v for k, v in obj.items() if k not in ("target_argmax", "rows_per_layer", "retained_per_layer",
                                                              "answer_ids", "ttft_ms_rounds", "speedup_rounds")}
            print(json.dumps(slim, default=str), flush=True)

    emit({"event": "setup", "model": lm.name, "load_s": round(load_s, 2), "estimate_s": round(est, 1),
          **result["machine"]})
    refs: dict[tuple, Reference] = {}
    total = sum(len(bc.method_names(length, mem_len)) * (1 + bc.reps) for length, _ in tasks)
    bar = tqdm(total=total, desc=f"{bc.name}", disable=not bc.progress, unit="run", file=sys.stderr)
    for index, (length, pair) in enumerate(tasks):
        if bc.budget_s is not None and time.perf_counter() - t_start > bc.budget_s:
            result["skipped_pairs"] += 1
            continue
        source = pair_source(pair)
        chat = source == "facts"
        key = (length, source, pair.doc_id, pair.reference if chat else None)
        if key not in refs:
            refs.clear()  # keep one reference alive
            refs[key] = make_reference(eng, encode_prompt(eng, pair.reference, chat), bc.kv_placement)
            if eng.device.type == "cuda":
                torch.cuda.empty_cache()
        ref = refs[key]
        ids = encode_prompt(eng, pair.variant, chat)
        common = {"pair": index, "length": length, "source": source, "doc_id": pair.doc_id, "edit": pair.edit,
                  "ratio": pair.ratio, "ref_tokens": int(ref.ids.size), "ref_kv_bytes": ref.kv_bytes,
                  "placement": bc.kv_placement,
                  "similarity": float(similarity(eng.fingerprint(ids), eng.fingerprint(ref.ids)))}
        names = bc.method_names(length, mem_len)

        def on_run(name, phase, _length=length, _edit=pair.edit):
            if phase != "warm-up":
                bar.update(1)
            bar.set_postfix_str(f"{_length} {_edit} {phase} {name}")

        rng = random.Random(f"{bc.seed}:{index}")
        for rec in run_pair(eng, ids, ref, pair, names, specs, cfgs, bc, rng, on_run):
            rec = {**common, **rec}
            result["records"].append(rec)
            emit({"event": "record", **rec})
        bar.update(len(names))  # the warm-up runs
        if eng.device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    result["elapsed_s"] = time.perf_counter() - t_start
    if eng.device.type == "cuda":
        result["machine"]["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    emit({"event": "done", "elapsed_s": round(result["elapsed_s"], 1), "records": len(result["records"]),
          "skipped_pairs": result["skipped_pairs"]})
    return result
