"""Continuous batching: one engine thread owns the model and runs steps for many requests.

    sched = Scheduler(engine, SchedulerConfig(max_running=16))
    sched.start()
    sched.submit(Request(ids, GenParams(max_new_tokens=64), sink=callback))  # any thread
    ...
    sched.cancel(request_id)                                                  # any thread
    sched.stop()

Each step (:meth:`Scheduler.step`):

1. takes new submissions and cancellations (a cancelled request's slot and KV are freed
   now, whatever state it was in);
2. admits waiting requests in arrival order while fewer than ``max_running`` are admitted
   and their KV reservations fit ``kv_budget_bytes`` (a request that can never fit is
   refused; one that does not fit *now* waits);
3. runs prefill work within the step's token budget (``max_step_tokens`` minus one token
   per running decode; the first unit always runs): a hit or a replay is one unit, a
   full prefill goes in chunks of ``prefill_chunk`` tokens, so a running decode stalls
   by at most about one chunk (a chunk never shrinks to fit what is left). When
   a prefill completes, its first token is sampled from the prefill logits and the
   request joins the decode batch;
4. runs ONE batched decode forward for every running request
   (:func:`semshare_core.batch.batch_step`) and samples each request's next token with
   its own generator (same seed: same tokens as at batch 1).

Results leave through each request's ``sink(event)`` (called on the engine thread;
keep it cheap, e.g. ``loop.call_soon_threadsafe``). Events, in order:

* ``("prefilled", PrefillResult)``: the prompt's KV is ready (export it now: the
  decode works on its own copy, ``pre.keys``/``pre.values`` are never mutated);
* ``("token", id)``: one per generated token;
* ``("finished", reason)``: ``stop`` (a stop token), ``length`` (``max_new_tokens``) or
  ``cancelled``;
* ``("error", exception)``: the request failed (``RequestRefused`` when it can never
  fit the budgets).

With ``Request.early_first_token`` an identical repeat (a replay) gets its first ``token``
at submit, from the stored logits, before ``prefilled``; the engine thread may be busy with
another request's step for up to a second, and the replay needs nothing from it for that
token. If such a request is cancelled or fails before its prefill, ``finished`` / ``error``
follow that token without a ``prefilled``.

A hit whose reuse path raises is retried at once as a full prefill; the exception is
kept in ``Request.reuse_error`` (the server reports the entry).
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .batch import SeqKV
from .engine import PrefillResult, SemShareEngine, sample_token
from .kv import PackedKV

logger = logging.getLogger(__name__)


class RequestRefused(Exception):
    """A request the scheduler will never run (it exceeds a budget on its own), or a full queue."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one replica's scheduler.

    ``max_running``: requests admitted at once (prefilling or decoding): the decode
    batch size at most. ``max_step_tokens``: prompt tokens prefilled plus tokens
    decoded per step (what a prefill unit counts: :meth:`Scheduler.unit_cost`; at least
    one unit runs per step). ``prefill_chunk``: tokens per full-prefill chunk.
    ``idle_prefill_tokens``: a full prefill of at most this many tokens that starts while
    nothing else is running, prefilling or waiting runs in one piece instead: there is no
    stream to protect, one piece is cheaper than chunks (measured: ``benchmarks.idle_prefill``),
    and it is exactly ``generate``'s prefill. A request that arrives meanwhile waits for it,
    so the cap bounds that wait; 0 = always chunk.
    ``kv_budget_bytes``: KV memory the admitted requests may reserve: each reserves its
    prompt's full KV (held until exported) plus a decode cache for prompt +
    ``max_new_tokens`` rows, counted in the model's real per-token KV bytes; None =
    unbounded. ``max_waiting``: submissions not yet admitted; beyond it ``submit``
    refuses (retryable).
    """

    max_running: int = 16
    max_step_tokens: int = 512
    prefill_chunk: int = 512
    idle_prefill_tokens: int = 2048
    kv_budget_bytes: Optional[int] = None
    max_waiting: int = 64
    step_history: int = 4096
    step_delay_s: float = 0.0  # fault injection (tests, chaos drills): a slow replica sleeps after each decode step

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError("max_running must be >= 1")
        if self.max_step_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("max_step_tokens and prefill_chunk must be >= 1")
        if self.idle_prefill_tokens < 0:
            raise ValueError("idle_prefill_tokens must be >= 0")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            raise ValueError("kv_budget_bytes must be >= 1 (or None)")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")


@dataclass(frozen=True)
class GenParams:
    """Per-request decoding: greedy when ``temperature <= 0``; ``seed`` fixes sampling.
    ``max_new_tokens`` 0: prefill only (the ``prefilled`` event, then ``finished``)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_on_eos: bool = True


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation. ``reference``/``reference_kv``: a hit's reference (see
    :meth:`SemShareEngine.prefill`); ``config``: per-request SemShareConfig override."""

    ids: np.ndarray
    params: GenParams
    sink: Callable[[tuple], None]
    reference: Optional[PackedKV] = None
    reference_kv: Optional[torch.Tensor] = None
    config: object = None
    sources: Optional[list] = None        # several references at once (PackedKV each), best first
    sources_kv: Optional[list] = None     # their device tensors (None where not on the device)
    early_first_token: bool = False       # a replay's first token is sent at submit (see Scheduler.submit)
    id: int = field(default_factory=lambda: next(_ids))
    # filled in by the scheduler
    state: str = "new"           # waiting | prefilling | running | done
    reuse_error: Optional[BaseException] = None
    result: Optional[PrefillResult] = None
    generated: int = 0
    submitted_at: float = 0.0
    first_token_at: Optional[float] = None
    reserved: int = 0
    _steps: object = None
    _seq: Optional[SeqKV] = None
    _gen: Optional[torch.Generator] = None
    _last: int = -1
    _prefilled_tokens: int = 0
    _early: Optional[int] = None  # the first token, sampled and sent at submit


@dataclass
class StepRecord:
    """What one step did (for metrics): requests decoded, prompt tokens prefilled, wall ms."""

    batch: int
    prefill_tokens: int
    decoded: int
    ms: float
    running: int
    waiting: int


def _name_os_thread(name: bytes) -> None:
    """Give the calling thread an OS-visible name (Linux ``prctl(PR_SET_NAME)``, <= 15 bytes);
    elsewhere, or on failure, nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Scheduler:
    """The engine thread (see module docstring). Thread-safe ``submit``/``cancel``/``stats``."""

    def __init__(self, engine: SemShareEngine, config: SchedulerConfig | None = None):
        self.engine = engine
        self.config = config or SchedulerConfig()
        sig = engine.signature
        elem = torch.empty((), dtype=engine.dtype).element_size()
        self.kv_bytes_per_token = sig.num_layers * 2 * sig.num_kv_heads * sig.head_dim * elem
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: set[int] = set()
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.reserved_bytes = 0
        self.history: collections.deque[StepRecord] = collections.deque(maxlen=self.config.step_history)
        self.counters = {"submitted": 0, "refused": 0, "finished": 0, "cancelled": 0, "errors": 0, "steps": 0,
                         "decoded_tokens": 0, "prefill_tokens": 0, "reuse_retries": 0}
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._reset_done: Optional[threading.Event] = None  # set: the engine thread resets the stats

    # any thread ------------------------------------------------------------------
    def reservation(self, n_prompt: int, max_new_tokens: int) -> int:
        """KV bytes a request reserves: its prompt's full KV (until exported) + a decode
        cache of prompt + new tokens."""
        return self.kv_bytes_per_token * (2 * int(n_prompt) + int(max_new_tokens))

    def submit(self, req: Request) -> None:
        """Queue ``req``. Raises :class:`RequestRefused` when it can never fit the KV budget
        or the wait queue is full (retryable). With ``req.early_first_token``, a replay's first
        token is sent from here (:meth:`_early_token`): keep the sink cheap."""
        budget = self.config.kv_budget_bytes
        need = self.reservation(req.ids.size, req.params.max_new_tokens)
        if budget is not None and need > budget:
            self.counters["refused"] += 1
            raise RequestRefused(f"the prompt ({req.ids.size} tokens) and max_tokens ({req.params.max_new_tokens}) "
                                 f"need {need} bytes of KV; this replica's KV budget is {budget}")
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= max(1, self.config.max_waiting):
                self.counters["refused"] += 1
                raise RequestRefused(f"{len(self.waiting) + len(self._inbox)} requests already wait", retryable=True)
            req.state, req.submitted_at, req.reserved = "waiting", time.perf_counter(), need
            early = self._early_token(req) if req.early_first_token else None
            if early is not None:  # sent before the engine thread can see the request: it comes first
                self._send(req, ("token", early))
            self._inbox.append(req)
            self.counters["submitted"] += 1
            self._lock.notify()

    def _early_token(self, r: Request) -> Optional[int]:
        """A replay's first token, sampled now from its reference's stored last logits.

        An identical repeat needs no compute for its first token, but the engine thread may
        be in the middle of a step (a hit, a prefill chunk, a decode) for ~0.1-1 s; with
        ``early_first_token`` the token leaves at submit instead. It is the token the replay
        would sample (same logits, same seeded generator, drawn first); the KV copy and the
        join to the decode batch follow at the next step. Events then come in the order
        ``token``, ``prefilled``, ``token``... None (the usual order) when ``r`` does not
        replay or its logits are unusable."""
        ref = self.replayed(r) if r.params.max_new_tokens >= 1 else None
        if ref is None:
            return None
        try:
            self.engine.signature.check(ref.signature)
        except Exception:  # noqa: BLE001 - the engine drops this reference and prefills: no early token
            return None
        logits = torch.from_numpy(np.array(ref.last_logits, dtype=np.float32)).reshape(-1)
        if not bool(torch.isfinite(logits).all()):
            return None
        r._gen = self._generator(r)
        tok = sample_token(logits, r.params.temperature, r.params.top_p, r._gen)
        r._early, r._last, r.generated, r.first_token_at = tok, tok, 1, time.perf_counter()
        return tok

    @staticmethod
    def _generator(r: Request) -> torch.Generator:
        seed = r.params.seed if r.params.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        return torch.Generator(device="cpu").manual_seed(seed)

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (its slot and KV are freed there)."""
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify()

    def stats(self) -> dict:
        return {**self.counters, "running": len(self.running), "prefilling": len(self.prefilling),
                "waiting": len(self.waiting) + len(self._inbox), "reserved_bytes": self.reserved_bytes,
                "kv_bytes": self.kv_bytes(), "kv_budget_bytes": self.config.kv_budget_bytes}

    def reset_stats(self, timeout: float = 10.0) -> None:
        """Zero the counters and forget the step history (e.g. after a warm-up, so that
        metrics count real traffic only). Only while idle: raises if any request is queued,
        prefilling or running. With the engine thread started, the reset is done by it
        between two steps (a request's last event leaves before its step is counted)."""
        done = threading.Event()
        with self._lock:
            if self._inbox or self.has_work():
                raise RuntimeError("reset_stats while requests are in the scheduler")
            if self._thread is None:
                self._clear_stats()
                return
            self._reset_done = done
            self._lock.notify()
        if not done.wait(timeout):
            raise TimeoutError(f"the engine thread did not reset its stats within {timeout:g}s")

    def _clear_stats(self) -> None:
        self.counters = dict.fromkeys(self.counters, 0)
        self.history.clear()

    def _reset_if_asked(self) -> None:
        """Engine thread, holding the lock, between steps: a reset asked by :meth:`reset_stats`."""
        if self._reset_done is not None:
            self._clear_stats()
            self._reset_done.set()
            self._reset_done = None

    def kv_bytes(self) -> int:
        """Bytes of KV the admitted requests hold now (decode buffers + prompt KV not yet released)."""
        total = 0
        for r in list(self.running) + list(self.prefilling):
            if r._seq is not None:
                total += r._seq.nbytes
            pre = r.result
            if pre is not None and pre.keys:
                total += sum(k.numel() * k.element_size() * 2 for k in pre.keys)
        return total

    # the engine thread -------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="semshare-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        _name_os_thread(b"semshare-engine")  # `top -H` / per-thread CPU show the engine thread apart
        with torch.inference_mode():
            while True:
                with self._lock:
                    self._reset_if_asked()
                    while not self._stop and not self._inbox and not self._cancels and not self.has_work():
                        self._lock.wait()
                        self._reset_if_asked()
                    if self._stop:
                        break
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a step failure must not kill the thread
                    logger.exception("scheduler step failed")
        for r in list(self.waiting) + self.prefilling + self.running:
            self._finish(r, error=RequestRefused("the replica is shutting down", retryable=True))

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def step(self) -> StepRecord:
        """One scheduling step (called by the engine thread; tests may call it directly)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._take_inbox()
            self._admit()
            prefill_tokens = self._prefill_work()
            decoded = self._decode()
        rec = StepRecord(decoded, prefill_tokens, decoded, (time.perf_counter() - t0) * 1e3, len(self.running),
                         len(self.waiting))
        self.counters["steps"] += 1
        self.history.append(rec)
        return rec

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self.waiting.extend(new)
        if not cancels:
            return
        for group in (self.waiting, self.prefilling, self.running):
            for r in [r for r in group if r.id in cancels]:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        budget = self.config.kv_budget_bytes
        while self.waiting and len(self.prefilling) + len(self.running) < self.config.max_running:
            r = self.waiting[0]
            if budget is not None and self.reserved_bytes + r.reserved > budget and (self.prefilling or self.running):
                return  # waits until running requests free their reservations
            self.waiting.popleft()
            self.reserved_bytes += r.reserved
            r.state = "prefilling"
            self.prefilling.append(r)

    def _prefill_work(self) -> int:
        budget = self.config.max_step_tokens - len(self.running)
        used = 0
        if len(self.prefilling) > 1:  # replays first: each costs one KV copy, not a prefill
            self.prefilling.sort(key=lambda r: not (r._steps is None and self.replays(r)))  # stable
        while self.prefilling:
            r = self.prefilling[0]
            cost = self.unit_cost(r)
            if used and used + cost > budget:
                break  # the next unit waits for the next step (decodes run in between)
            try:
                done = self._prefill_unit(r)
            except Exception as e:  # noqa: BLE001 - the request fails, the others go on
                logger.exception("prefill of request %d failed", r.id)
                self._finish(r, error=e)
                continue
            used += max(done[0], cost if done[1] else 0)
            if not done[1] and r._steps is not None:
                break  # a chunked prefill continues next step
        self.counters["prefill_tokens"] += used
        return used

    def replayed(self, r: Request) -> Optional[PackedKV]:
        """The reference (or source) ``r``'s prefill replays: the same prompt with its last
        logits, as :meth:`SemShareEngine.prefill` checks (an identical repeat: one KV copy,
        nothing computed); None when it does not replay."""
        cfg = r.config or self.engine.config
        n = int(r.ids.size)
        if not cfg.replay_exact or n < cfg.min_reuse_tokens:
            return None
        refs = [r.reference] if r.reference is not None else list(r.sources or ())
        return next((ref for ref in refs if ref.last_logits is not None and ref.seq_len == n
                     and np.array_equal(ref.token_ids, r.ids)), None)

    def replays(self, r: Request) -> bool:
        """Whether ``r``'s prefill is a replay (:meth:`replayed`)."""
        return self.replayed(r) is not None

    def unit_cost(self, r: Request) -> int:
        """Prompt tokens the next unit of ``r``'s prefill counts against ``max_step_tokens``:
        a full-prefill chunk its tokens; a hit a quarter of its prompt (at the default
        schedule it recomputes ~25-30% of the rows); an identical-prompt replay 1.
        Replays also go first (:meth:`_prefill_work`), as SGLang's cache-aware order puts
        the requests with the longest cached prefix first: an identical repeat waiting
        behind hits and full prefills would otherwise wait seconds for a few ms of work."""
        n = int(r.ids.size)
        if r.reference is not None or r.sources:
            if self.replays(r):
                return 1
            return max(1, n // 4)
        return min(self.config.prefill_chunk, n - r._prefilled_tokens)

    def _prefill_unit(self, r: Request) -> tuple[int, bool]:
        """Run one unit of ``r``'s prefill: ``(tokens processed, prefill finished)``."""
        eng = self.engine
        if r._steps is None:
            r._steps = eng.prefill_steps(r.ids, r.reference, r.config, r.reference_kv, chunk=self._chunk_for(r),
                                         sources=r.sources, sources_kv=r.sources_kv)
            r._prefilled_tokens = 0
        try:
            n = next(r._steps)
            r._prefilled_tokens += n
            return n, False
        except StopIteration as stop:
            pre: PrefillResult = stop.value
        except Exception as e:
            if (r.reference is None and not r.sources) or r.reuse_error is not None:
                raise
            # the reuse path failed: a full prefill instead (the entry is reported by the server)
            logger.warning("reuse prefill of request %d failed (%s: %s): full prefill", r.id, type(e).__name__, e)
            self.counters["reuse_retries"] += 1
            r.reuse_error, r.reference, r.reference_kv, r._steps = e, None, None, None
            r.sources = r.sources_kv = None
            return 0, False
        self._prefilled(r, pre)
        return int(r.ids.size) - r._prefilled_tokens, True

    def _chunk_for(self, r: Request) -> Optional[int]:
        """Chunk size of ``r``'s full prefill (it applies only to one): None (one piece) when
        ``r`` starts on an idle scheduler and fits ``idle_prefill_tokens``, else ``prefill_chunk``."""
        cfg = self.config
        idle = not self.running and not self.waiting and not self._inbox and all(p is r for p in self.prefilling)
        return None if idle and int(r.ids.size) <= cfg.idle_prefill_tokens else cfg.prefill_chunk

    def _prefilled(self, r: Request, pre: PrefillResult) -> None:
        r.result, r._steps = pre, None
        r.reference = r.reference_kv = r.sources = r.sources_kv = None  # stop borrowing the references
        self.prefilling.remove(r)
        self._send(r, ("prefilled", pre))
        if r.params.max_new_tokens == 0:  # prefill only (e.g. an exact refresh for the index)
            self._finish(r, "length")
            return
        if r._early is not None:  # the first token already left at submit: only its end conditions
            if self._ended(r, r._early):
                return
        else:
            r._gen = self._generator(r)
            tok = sample_token(pre.logits.cpu(), r.params.temperature, r.params.top_p, r._gen)
            r.first_token_at = time.perf_counter()
            if self._emit(r, tok):
                return
        r._seq = self.engine.decode_state(pre)
        r.state = "running"
        self.running.append(r)

    def _emit(self, r: Request, tok: int) -> bool:
        """Send ``tok``; finish the request when it ends here. True when finished."""
        r.generated += 1
        r._last = tok
        self._send(r, ("token", tok))
        return self._ended(r, tok)

    def _ended(self, r: Request, tok: int) -> bool:
        """Finish ``r`` if ``tok`` (its latest, already sent) ends it: EOS or ``max_new_tokens``."""
        if r.params.stop_on_eos and tok in self.engine.eos_ids:
            self._finish(r, "stop")
            return True
        if r.generated >= r.params.max_new_tokens:
            self._finish(r, "length")
            return True
        return False

    def _decode(self) -> int:
        batch = list(self.running)
        if not batch:
            return 0
        try:
            with self.engine.lock:
                logits = self.engine.decode_step([r._seq for r in batch], [r._last for r in batch])
        except Exception as e:  # noqa: BLE001 - the batch's caches are in an unknown state
            logger.exception("decode step for %d requests failed", len(batch))
            for r in batch:
                self._finish(r, error=e)
            return 0
        logits = logits.cpu()
        greedy = logits.argmax(-1).tolist()  # one call for the batch (first maximum, as argmax of a row)
        for i, r in enumerate(batch):
            p = r.params
            self._emit(r, greedy[i] if p.temperature <= 0 else sample_token(logits[i], p.temperature, p.top_p, r._gen))
        self.counters["decoded_tokens"] += len(batch)
        if self.config.step_delay_s:
            time.sleep(self.config.step_delay_s)
        return len(batch)

    def _finish(self, r: Request, reason: str | None = None, error: BaseException | None = None) -> None:
        for group in (self.prefilling, self.running):
            if r in group:
                group.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r.state in ("prefilling", "running"):
            self.reserved_bytes -= r.reserved
        if r._steps is not None:
            r._steps.close()
        r.state, r._seq, r._steps, r.reference, r.reference_kv = "done", None, None, None, None
        r.sources = r.sources_kv = None
        if r.result is not None:
            r.result.cache = None
        if error is not None:
            self.counters["errors"] += 1
            self._send(r, ("error", error))
        else:
            self.counters["cancelled" if reason == "cancelled" else "finished"] += 1
            self._send(r, ("finished", reason))
        r.result = None

    @staticmethod
    def _send(r: Request, event: tuple) -> None:
        try:
            r.sink(event)
        except Exception:  # noqa: BLE001 - a consumer that went away must not stop the engine
            logger.exception("request %d: its sink failed on %s", r.id, event[0])
