"""Warm-up of a model replica, run in its constructor, before Serve counts it RUNNING.

The first forward passes of a process pay one-off costs (kernel selection, oneDNN /
cuBLAS handles and primitive caches, allocator growth, pinned staging buffers, the
intra-op thread pool of the engine thread). :func:`warm_up` pays them once, through the
real engine path, on the replica's own scheduler thread:

0. where the batched decode step or the full prefill is compiled (``compile_decode``,
   ``compile_prefill``), their compiles: a short throwaway prompt prefilled in two chunks and
   then as a hit over its own KV (the hits' layer graph), two throwaway requests decoded
   together, on the calling thread while the scheduler idles
   (:meth:`SemShareEngine.warm_compiled_prefill` / ``warm_compiled_decode``; a failed compile
   leaves the eager path);
1. a full prefill of a short fixed prompt (at most ``WARMUP_MAX_TOKENS`` tokens, from
   the served tokenizer) and ``WARMUP_DECODE_STEPS`` batched decode steps;
2. a hit: the same prompt with one token changed, prefilled with the first prompt's own
   exported KV as the reference (the selective path: mapping, gather / staging, the
   selective prefill), and the same decode steps. On the CPU the reference goes in with
   its device tensor (as a cold or hot hit does there); on an accelerator without one,
   so the layered pinned staging runs (as a cold hit does there).

Nothing touches the index or the hot tier (nothing registered, nothing kept), and the
scheduler's counters and step history are reset afterwards, so metrics count real
traffic only. A failure of the full prefill or decode raises (the replica could serve
nothing); a failure of the hit path is reported (real hits would fall back to full
prefills, as they do whenever reuse fails).
"""
from __future__ import annotations

import queue
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from semshare_core.scheduler import GenParams, Request, Scheduler

WARMUP_TEXT = ("Before the first request arrives, this replica runs one short prompt through its own "
               "engine: a full prefill, a few decode steps, and a hit that reuses the prompt's own cached "
               "keys and values, so that no user pays for the first call of any kernel.")
WARMUP_MAX_TOKENS = 64   # prompt tokens at most
WARMUP_DECODE_STEPS = 2  # batched decode steps per warm-up request
WARMUP_TIMEOUT_S = 120.0  # per warm-up request (a big model on a slow CPU)


@dataclass(frozen=True)
class WarmupReport:
    """What the warm-up ran. ``hit``: the selective hit path ran (``staging``: how its
    reference rows reached the model); ``hit_error``: why it did not, if it failed."""

    ms: float
    prompt_tokens: int
    decode_steps: int
    hit: bool
    staging: Optional[str] = None
    hit_error: Optional[str] = None
    compile_s: Optional[float] = None  # the compiled decode step's compile (None: not compiled)
    compile_prefill_s: Optional[float] = None  # the compiled full prefill's compile (None: not compiled)

    def as_dict(self) -> dict:
        return {"ran": True, **asdict(self), "ms": round(self.ms, 3)}


def warmup_prompt(engine) -> np.ndarray:
    """int64 ``[n]``: :data:`WARMUP_TEXT` in the served tokenizer, at most ``WARMUP_MAX_TOKENS``."""
    return np.ascontiguousarray(engine.encode(WARMUP_TEXT)[:WARMUP_MAX_TOKENS], dtype=np.int64)


def edited(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``ids`` ``[n]`` with its middle token replaced by another id: a near-duplicate prompt,
    so a hit on ``ids``' KV runs the selective path rather than an identical-prompt replay."""
    out = ids.copy()
    m = ids.size // 2
    out[m] = (int(ids[m]) + 1) % vocab_size
    return out


def _run(scheduler: Scheduler, ids: np.ndarray, config, reference=None,
         reference_kv=None) -> tuple[Request, object, int]:
    """Run one warm-up request (greedy, ``WARMUP_DECODE_STEPS`` decode steps, EOS ignored)
    to its end: ``(request, PrefillResult, tokens generated)``. Raises the request's error,
    or on a timeout."""
    events: queue.Queue = queue.Queue()
    params = GenParams(max_new_tokens=WARMUP_DECODE_STEPS + 1, temperature=0.0, seed=0, stop_on_eos=False)
    req = Request(ids, params, events.put, reference=reference, reference_kv=reference_kv, config=config)
    scheduler.submit(req)
    pre, tokens = None, 0
    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    while True:
        try:
            kind, val = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            scheduler.cancel(req.id)
            raise TimeoutError(f"warm-up request did not finish within {WARMUP_TIMEOUT_S:g}s") from None
        if kind == "prefilled":
            pre = val
        elif kind == "token":
            tokens += 1
        elif kind == "error":
            raise val
        elif kind == "finished":
            if pre is None:
                raise RuntimeError(f"warm-up request finished ({val}) without a prefill")
            return req, pre, tokens


def warm_up(engine, scheduler: Scheduler) -> WarmupReport:
    """Run the warm-up (module docstring) on ``scheduler`` (started, idle, owning ``engine``)
    and reset its counters. Raises when the full prefill or the decode fails."""
    t0 = time.perf_counter()
    compile_prefill_s = engine.warm_compiled_prefill()
    compile_s = engine.warm_compiled_decode()
    ids = warmup_prompt(engine)
    # no floor of recomputed rows and no minimum length: the short prompt really takes the hit path
    cfg = engine.config.with_(recompute_min_tokens=0, min_reuse_tokens=1)
    _, pre, tokens = _run(scheduler, ids, cfg)
    packed = engine.export_kv(pre)  # the decode never mutates pre.keys/values: still the prompt's KV
    pre.release_full_kv()
    kv = packed.to_torch(engine.device, engine.dtype) if engine.device.type == "cpu" else None
    req, hit_pre, _ = _run(scheduler, edited(ids, engine.signature.vocab_size), cfg, packed, kv)
    hit_pre.release_full_kv()
    err = req.reuse_error
    hit = bool(hit_pre.stats.hit) and err is None
    scheduler.reset_stats()
    return WarmupReport((time.perf_counter() - t0) * 1e3, int(ids.size), max(0, tokens - 1), hit,
                        hit_pre.stats.staging if hit else None,
                        None if err is None else f"{type(err).__name__}: {err}",
                        None if compile_s is None else round(compile_s, 3),
                        None if compile_prefill_s is None else round(compile_prefill_s, 3))
