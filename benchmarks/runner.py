"""The benchmark loop: models, pairs, runs of every method, records.

For each (prompt length, document, edit kind, edit ratio) pair the reference prompt is
prefilled once and its KV packed (and stored as bytes, as host numpy, or on the
device: ``kv_placement``). Then each method prefills the variant ``1 + reps`` times:
the first run is a warm-up (its cache is used to teacher-force the full-prefill
continuation: perplexity), the timed runs give the TTFT median, and the last run's
cache is decoded greedily for ``new_tokens`` tokens (ROUGE-L against the full
prefill's continuation, first-token agreement).
"""
from __future__ import annotations

import json
import math
import os
import platform
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

from . import dataset, metrics
from .methods import (MethodSpec, Reference, decode_cache_bytes, make_reference, method_specs, run_method,
                      teacher_forced_nll)

MODELS = ("smollm2", "tiny-random", "llama3-8b-random")
DEFAULT_METHODS = ("full", "prefix", "semshare_r0", "semshare", "semshare_pruned")


@dataclass
class BenchConfig:
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str | None = None            # default: bfloat16, float32 for tiny-random
    model_shape: str = "full"           # llama3-8b-random only: "full" (8B) or "small" (CPU check)
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    edits: list[str] = field(default_factory=lambda: ["replace", "mixed", "instruction"])
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    pairs: int = 1
    new_tokens: int = 32
    reps: int = 2
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    pruned_retention: float = 0.5
    memory_length: int | None = None    # default: the middle length
    memory_retentions: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.3])
    kv_placement: str = "bytes"
    budget_s: float | None = None
    jsonl: bool = False
    name: str = "bench"
    out_dir: str = "benchmarks/results"
    progress: bool = True
    threads: int | None = None          # torch intra-op threads (default: torch's; 1 for tiny-random)

    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.model == "tiny-random" else "bfloat16")


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
def build_tasks(eng: SemShareEngine, bc: BenchConfig) -> list[tuple[int, dataset.PromptPair]]:
    """``(nominal length, pair)``, interleaved over lengths so a budget cut keeps every length."""
    def count_tokens(text: str) -> int:
        return len(eng.tokenizer(text, add_special_tokens=False)["input_ids"])

    overhead = int(eng.encode(dataset.INSTRUCTIONS[1] + "\n\n").size) + 1
    per_length = []
    for length in bc.lengths:
        docs = dataset.make_documents(bc.pairs, max(8, length - overhead), count_tokens, seed=bc.seed)
        per_length.append([(length, p) for p in dataset.make_pairs(docs, bc.edits, bc.ratios, seed=bc.seed)])
    tasks = []
    for i in range(max(len(x) for x in per_length)):
        tasks.extend(x[i] for x in per_length if i < len(x))
    return tasks


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _text(eng: SemShareEngine, toks: list[int]) -> str:
    vocab = len(eng.tokenizer)
    return eng.decode_text([t for t in toks if t < vocab])


# one method on one pair -----------------------------------------------------------------
def run_one(eng: SemShareEngine, ids: np.ndarray, ref: Reference, spec: MethodSpec, bc: BenchConfig,
            full: dict | None) -> dict:
    """Record of one method on one pair. ``full``: the full-prefill record (None when this is it)."""
    n, L = int(ids.size), eng.num_layers
    runs = []
    warm = None
    for r in range(1 + bc.reps):
        pre, first, ttft, timings = run_method(eng, ids, ref, spec)
        runs.append((ttft, timings, pre.stats))
        if r == 0:
            warm = pre
        elif r < bc.reps:
            del pre
    last = pre
    ttfts = [t for t, _, _ in runs[1:]]
    stats = last.stats
    timed = runs[1:]
    rec = {
        "method": spec.name, "kind": spec.kind, "recompute_ratio": spec.recompute_ratio, "retention": spec.retention,
        "n_tokens": n, "ttft_ms": statistics.median(ttfts), "ttft_ms_reps": [round(t, 3) for t in ttfts],
        "fetch_ms": _median([t["fetch_ms"] for _, t, _ in timed]),
        "mapping_ms": _median([s.mapping_ms for _, _, s in timed]),
        "gather_ms": _median([s.gather_ms for _, _, s in timed]),
        "prefill_ms": _median([s.prefill_ms for _, _, s in timed]),
        "flop_proxy": sum(stats.rows_per_layer) / (n * L),
        "rows_per_layer": list(stats.rows_per_layer),
        "retained_per_layer": list(stats.retained_per_layer),
        "kv_bytes": decode_cache_bytes(last.cache),
        "reused_tokens": int(stats.reused_tokens), "reused_share": stats.reused_tokens / n,
        "recomputed_tokens": int(stats.recomputed_tokens), "mapping": dict(stats.mapping), "hit": bool(stats.hit),
        "first_token": int(torch.argmax(last.logits)),
    }
    if bc.new_tokens > 0:
        toks = list(eng.decode(last, max_new_tokens=bc.new_tokens, temperature=0.0, stop_on_eos=False))
        rec["tokens"] = toks
        rec["text"] = _text(eng, toks)
        target = toks if full is None else full["tokens"]
        nll, k = teacher_forced_nll(eng, warm, target)
        rec["nll"] = nll
        rec["ppl"] = metrics.perplexity(nll, k)
    del warm, last
    if full is None:
        rec["speedup"] = 1.0
        if bc.new_tokens > 0:
            rec.update(rouge_l=1.0, rouge_l_tokens=1.0, first_token_agree=True, ppl_ratio=1.0)
    else:
        rec["speedup"] = full["ttft_ms"] / rec["ttft_ms"]
        rec["first_token_agree"] = rec["first_token"] == full["first_token"]
        if bc.new_tokens > 0:
            rec["rouge_l"] = metrics.rouge_l(rec["text"], full["text"])
            rec["rouge_l_tokens"] = metrics.rouge_l(rec["tokens"], full["tokens"])
            rec["ppl_ratio"] = math.exp((rec["nll"] - full["nll"]) / len(full["tokens"]))
    return rec


def warm_up(eng: SemShareEngine, bc: BenchConfig) -> None:
    """One full and one reuse prefill on a short prompt (kernels, lazy inits)."""
    sents = dataset._topic_sentences()[0]
    ids = eng.encode(dataset.build_prompt(sents[:6]))
    ref = make_reference(eng, ids, bc.kv_placement)
    for spec in method_specs(eng.config).values():
        if spec.name in ("full", "prefix", "semshare"):
            run_method(eng, ids, ref, spec)


# the whole run --------------------------------------------------------------------------
def run(bc: BenchConfig, log=None) -> dict:
    """Run the grid; returns the result dict (config, machine, records) without writing it."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    threads = bc.threads or (1 if bc.model == "tiny-random" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(bc.seed)
    lm = load_model(bc)
    eng = SemShareEngine(lm.model, lm.tokenizer, SemShareConfig(seed=bc.seed))
    load_s = time.perf_counter() - t_start
    mem_len = bc.memory_length or (sorted(bc.lengths)[len(bc.lengths) // 2] if bc.lengths else None)
    extra = tuple(r for r in bc.memory_retentions if r not in (1.0, bc.pruned_retention))
    specs = method_specs(eng.config, bc.pruned_retention, extra)
    unknown = [m for m in bc.methods if m not in specs]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(specs)}")
    methods = [m for m in bc.methods if m != "full"]
    warm_up(eng, bc)
    tasks = build_tasks(eng, bc)
    result = {"config": {**asdict(bc), "dtype": bc.resolved_dtype(), "memory_length": mem_len,
                         "semshare_config": eng.config.to_dict()},
              "machine": machine_info(bc.device), "model_name": lm.name,
              "model": {"layers": eng.num_layers, "kv_heads": eng.signature.num_kv_heads,
                        "head_dim": eng.signature.head_dim, "hidden": eng.signature.hidden_size,
                        "params": sum(p.numel() for p in lm.model.parameters())},
              "load_s": load_s, "records": [], "skipped_pairs": 0}

    def emit(obj: dict) -> None:
        if bc.jsonl:
            slim = {k: v for k, v in obj.items() if k not in ("tokens", "text", "rows_per_layer", "retained_per_layer")}
            print(json.dumps(slim, default=str), flush=True)

    emit({"event": "setup", "model": lm.name, "load_s": round(load_s, 2), **result["machine"]})
    refs: dict[tuple[int, int], Reference] = {}
    total = sum(1 + len(methods) + (len(extra) if length == mem_len and "semshare" in bc.methods else 0)
                for length, _ in tasks)
    bar = tqdm(total=total, desc=f"{bc.name}", disable=not bc.progress, unit="run", file=sys.stderr)
    for length, pair in tasks:
        if bc.budget_s is not None and time.perf_counter() - t_start > bc.budget_s:
            result["skipped_pairs"] += 1
            continue
        key = (length, pair.doc_id)
        if key not in refs:
            for k in [k for k in refs if k[0] != length]:  # keep only this length's references alive
                del refs[k]
            refs[key] = make_reference(eng, eng.encode(pair.reference), bc.kv_placement)
            if eng.device.type == "cuda":
                torch.cuda.empty_cache()
        ref = refs[key]
        ids = eng.encode(pair.variant)
        common = {"length": length, "doc_id": pair.doc_id, "edit": pair.edit, "ratio": pair.ratio,
                  "ref_tokens": int(ref.ids.size), "ref_kv_bytes": ref.kv_bytes, "placement": bc.kv_placement,
                  "similarity": float(similarity(eng.fingerprint(ids), eng.fingerprint(ref.ids)))}
        names = ["full"] + methods + (list(f"semshare_ret{r:g}" for r in extra)
                                      if length == mem_len and "semshare" in bc.methods else [])
        full = None
        for name in names:
            bar.set_postfix_str(f"{length} {pair.edit} {pair.ratio} {name}")
            rec = {**common, **run_one(eng, ids, ref, specs[name], bc, full)}
            if name == "full":
                full = rec
            result["records"].append(rec)
            emit({"event": "record", **rec})
            bar.update(1)
            if eng.device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    result["elapsed_s"] = time.perf_counter() - t_start
    if eng.device.type == "cuda":
        result["machine"]["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    emit({"event": "done", "elapsed_s": round(result["elapsed_s"], 1), "records": len(result["records"]),
          "skipped_pairs": result["skipped_pairs"]})
    return result
