"""`LLMServer`: one model replica. Prefill with semantic KV reuse, stream tokens.

Per request (``generate``, an async generator of event dicts):

1. encode (or apply the chat template) and check the prompt limit;
2. fingerprint -> ``IndexActor.lookup(vector, tenant, threshold)``; the actor being
   dead, restarting or slow is a miss (counted), never a failed request;
3. fetch the reference KV (``await ref``: numpy in the object store, zero-copy);
   a lost object / dead owner / timeout is a miss (the entry is reported lost); the
   object is checked (:func:`serve_app.kvcheck.load_reference`: type, shapes, size
   against the entry, model signature, CRC for the wire format, finite values) and a
   corrupted / truncated / foreign one is a miss too (the entry is reported bad);
4. ``engine.prefill(ids, reference)`` in a worker thread; any failure of the reuse
   path falls back to a full prefill (counted), never fails the request;
5. decode step by step in a worker thread, yielding text deltas; right after the
   first token the prompt's full KV is exported and registered (fire-and-forget,
   errors logged and counted).

Events: ``{"type": "error", status, message, error_type}`` (client mistakes, sent
instead of raising so the ingress can map them to 4xx), ``{"type": "token", id, text}``
and a final ``{"type": "done", ...}`` with usage, cache and timing facts.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Optional

import numpy as np
import torch
from ray import serve
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError
from ray.serve import metrics

from semshare_core import KVFormatError, KVMismatchError, SemShareEngine

from .index_actor import get_or_create_index_actor
from .kvcheck import load_reference
from .settings import AppArgs, load_model

logger = logging.getLogger("ray.serve")

TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
KEY_RE = re.compile(r"^[A-Za-z0-9_.\-:/]{1,128}$")
_END = object()
MIN_TEMPERATURE = 1e-3  # below: greedy


class ClientError(Exception):
    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.error_type = status, error_type


def _internal_key(tenant: str, key: str) -> str:
    """Keys are namespaced per tenant so a tenant can never overwrite another's entry."""
    return f"{tenant}:{key}"


def _public_key(internal: str) -> str:
    return internal.split(":", 1)[1] if ":" in internal else internal


class TextStream:
    """Incremental detokenisation: emit only text that is stable (no partial UTF-8)."""

    def __init__(self, engine: SemShareEngine):
        self.engine, self.ids, self.text = engine, [], ""

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        full = self.engine.decode_text(self.ids)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta

    def flush(self) -> str:
        full = self.engine.decode_text(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return delta


class StopMatcher:
    """OpenAI ``stop`` strings on a growing text: never emits a stop string or its prefix."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf, self.emitted, self.stopped = "", 0, False

    def feed(self, delta: str) -> str:
        self.buf += delta
        if not self.stops:
            out, self.emitted = self.buf[self.emitted:], len(self.buf)
            return out
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.buf[self.emitted:cut] if cut > self.emitted else ""
            self.emitted, self.stopped, self.buf = max(self.emitted, cut), True, self.buf[:cut]
            return out
        safe = max(self.emitted, len(self.buf) - self.hold)
        out, self.emitted = self.buf[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        out, self.emitted = self.buf[self.emitted:], len(self.buf)
        return out


@serve.deployment(name="LLMServer", health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=2)
class LLMServer:
    def __init__(self, args: dict):
        self.args = AppArgs(**args)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        t0 = time.perf_counter()
        lm = load_model(self.args)
        self.model_name = self.args.served_model_name()
        self.engine = SemShareEngine(lm.model, lm.tokenizer, self.args.semshare_config())
        self.load_s = time.perf_counter() - t0
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.replica_actor_name = ctx.replica_id.to_full_id_str()
        self._index_handle = None
        try:  # create / resolve the index actor now, so the first request does not wait for it
            a, cfg = self.args, self.engine.config
            self._index_handle = get_or_create_index_actor(
                a.index_name, a.index_namespace, cfg.fingerprint_dim, a.index_max_items, a.index_max_bytes,
                a.tenant_max_items, a.tenant_max_bytes)
            self._index_handle.ping.remote()
        except Exception as e:  # noqa: BLE001 - requests retry; the cache is optional
            logger.warning("index actor not available at start-up: %s", e)
        self._pending: set[asyncio.Task] = set()
        self._closing = False
        self.counters = {"requests": 0, "hits": 0, "misses": 0, "reuse_off": 0, "index_unavailable": 0,
                         "lost_objects": 0, "kv_mismatch": 0, "kv_corrupt": 0, "reuse_error": 0, "registered": 0,
                         "register_errors": 0, "active": 0}
        self.m_requests = metrics.Counter("semshare_requests", description="generation requests",
                                          tag_keys=("outcome",))
        self.m_hits = metrics.Counter("semshare_cache_hits", description="requests that reused a cached KV")
        self.m_reused = metrics.Counter("semshare_reused_tokens", description="prompt tokens taken from a cache")
        self.m_fallbacks = metrics.Counter("semshare_reuse_fallbacks", tag_keys=("reason",),
                                           description="reuse attempts that fell back to a full prefill")
        self.m_ttft = metrics.Histogram("semshare_ttft_ms", description="time to first token (replica side)",
                                        boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000])
        self.m_index_bytes = metrics.Gauge("semshare_index_bytes", description="KV bytes held by the index")
        logger.info("LLMServer %s loaded %s in %.1fs", self.replica, self.model_name, self.load_s)

    # index ---------------------------------------------------------------------------
    async def _index(self):
        if self._index_handle is None:
            a, cfg = self.args, self.engine.config
            self._index_handle = await asyncio.to_thread(
                get_or_create_index_actor, a.index_name, a.index_namespace, cfg.fingerprint_dim,
                a.index_max_items, a.index_max_bytes, a.tenant_max_items, a.tenant_max_bytes)
        return self._index_handle

    def _fallback(self, reason: str) -> str:
        self.counters[reason] = self.counters.get(reason, 0) + 1
        self.m_fallbacks.inc(tags={"reason": reason})
        return reason

    async def _lookup(self, vec: np.ndarray, tenant: str, threshold: float):
        """``(LookupResult | None, fallback_reason | None)``; never raises."""
        try:
            handle = await self._index()
            res = await asyncio.wait_for(handle.lookup.remote(vec, tenant, threshold), self.args.lookup_timeout_s)
            return res, None
        except (asyncio.TimeoutError, GetTimeoutError):
            logger.warning("index lookup timed out after %.1fs: full prefill", self.args.lookup_timeout_s)
            return None, self._fallback("index_unavailable")
        except RayActorError as e:
            logger.warning("index actor unavailable (%s): full prefill", type(e).__name__)
            self._index_handle = None  # re-resolve (or re-create) on the next request
            return None, self._fallback("index_unavailable")
        except Exception:  # noqa: BLE001 - the cache is an optimisation, never a failure
            logger.exception("index lookup failed: full prefill")
            self._index_handle = None
            return None, self._fallback("index_unavailable")

    async def _fetch(self, res) -> tuple[Any, Optional[str]]:
        """``(checked PackedKV | None, fallback_reason | None)``; never raises."""
        try:
            obj = await asyncio.wait_for(res.refs[0], self.args.kv_get_timeout_s)
        except (ObjectLostError, asyncio.TimeoutError, GetTimeoutError) as e:
            logger.warning("reference KV %s unavailable (%s): full prefill", res.key, type(e).__name__)
            self._spawn(self._report_bad(res.key, "lost"))
            return None, self._fallback("lost_objects")
        except RayActorError as e:
            logger.warning("reference KV %s owner unavailable (%s): full prefill", res.key, type(e).__name__)
            return None, self._fallback("lost_objects")
        except Exception as e:  # noqa: BLE001 - e.g. an object that cannot be deserialised
            logger.warning("reference KV %s unreadable (%s): full prefill", res.key, type(e).__name__)
            self._spawn(self._report_bad(res.key, "corrupt"))
            return None, self._fallback("kv_corrupt")
        try:
            packed = await asyncio.to_thread(load_reference, obj, self.engine.signature, res.ref_token_count)
            return packed, None
        except KVMismatchError as e:
            logger.warning("reference %s is from another model (%s): full prefill", res.key, e)
            self._spawn(self._report_bad(res.key, "mismatch"))
            return None, self._fallback("kv_mismatch")
        except Exception as e:  # noqa: BLE001 - KVFormatError and anything odd: never trust it
            logger.warning("reference %s rejected (%s: %s): full prefill", res.key, type(e).__name__, e)
            self._spawn(self._report_bad(res.key, "corrupt"))
            return None, self._fallback("kv_corrupt")
        finally:
            del obj

    async def _report_bad(self, key: str, reason: str) -> None:
        """Tell the index an entry's object is lost / corrupt / foreign: it drops and counts it."""
        try:
            handle = await self._index()
            call = handle.report_lost.remote(key) if reason == "lost" else handle.report_bad.remote(key, reason)
            await asyncio.wait_for(call, self.args.lookup_timeout_s * 5)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not report %s entry %s: %s", reason, key, e)

    async def _register(self, key: str, vec: np.ndarray, ids: np.ndarray, pre, tenant: str) -> None:
        try:
            packed = await asyncio.to_thread(self.engine.export_kv, pre)
            handle = await self._index()
            out = await handle.register.remote(key, vec, ids, packed, tenant)
            del packed
            if out.get("stored"):
                self.counters["registered"] += 1
                self.m_index_bytes.set(out.get("index_bytes", 0))
            else:
                logger.info("entry %s not stored: %s", key, out.get("reason"))
        except Exception as e:  # noqa: BLE001 - fire-and-forget, but never silent
            self.counters["register_errors"] += 1
            if isinstance(e, RayActorError):
                self._index_handle = None
            logger.warning("registering %s failed: %s: %s", key, type(e).__name__, e)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # request -------------------------------------------------------------------------
    def _prepare(self, req: dict) -> np.ndarray:
        if req.get("messages") is not None:
            try:
                ids = self.engine.encode_chat(req["messages"])
            except Exception as e:  # noqa: BLE001 - a template error is the client's messages
                raise ClientError(f"could not apply the chat template: {e}") from e
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                raise ClientError("prompt must be a string")
            ids = self.engine.encode(prompt)
        if ids.size == 0:
            raise ClientError("prompt is empty (no tokens)")
        if ids.size > self.args.max_prompt_tokens:
            raise ClientError(f"prompt has {ids.size} tokens; this server accepts at most "
                              f"{self.args.max_prompt_tokens}", error_type="context_length_exceeded")
        return ids

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """Stream events for one request (see module docstring)."""
        self.counters["active"] += 1
        try:
            async for ev in self._generate(req):
                yield ev
        finally:  # also on cancellation (client gone, request timeout)
            self.counters["active"] -= 1

    async def _generate(self, req: dict) -> AsyncIterator[dict]:
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        tenant = req.get("tenant") or "default"
        store_key = req.get("store_key")
        try:
            if not TENANT_RE.match(tenant):
                raise ClientError("invalid tenant name")
            if store_key is not None and not KEY_RE.match(str(store_key)):
                raise ClientError("store_key must match [A-Za-z0-9_.-:/]{1,128}")
            ids = await asyncio.to_thread(self._prepare, req)
        except ClientError as e:
            yield {"type": "error", "status": e.status, "message": str(e), "error_type": e.error_type}
            return

        use = bool(req.get("use_semshare", True))
        threshold = req.get("sim_threshold")
        if threshold is None:
            threshold = self.engine.config.sim_threshold
        vec = self.engine.fingerprint(ids) if use else None
        res, fallback, packed = None, None, None
        t_lookup = t_fetch = 0.0
        if use:
            ts = time.perf_counter()
            res, fallback = await self._lookup(vec, tenant, float(threshold))
            t_lookup = (time.perf_counter() - ts) * 1e3
            if res is not None:
                ts = time.perf_counter()
                packed, fallback = await self._fetch(res)
                t_fetch = (time.perf_counter() - ts) * 1e3
        try:
            pre = await asyncio.to_thread(self.engine.prefill, ids, packed)
        except (KVMismatchError, KVFormatError) as e:
            logger.warning("reference %s does not fit this model (%s): full prefill", res and res.key, e)
            fallback = self._fallback("kv_mismatch")
            pre = await asyncio.to_thread(self.engine.prefill, ids, None)
        except Exception as e:  # noqa: BLE001 - the reuse path must never fail a request
            if packed is None:
                raise
            logger.exception("reuse prefill with %s failed (%s): full prefill", res and res.key, type(e).__name__)
            fallback = self._fallback("reuse_error")
            packed = None
            pre = await asyncio.to_thread(self.engine.prefill, ids, None)
        del packed
        if res is not None:
            res.refs.clear()  # stop borrowing the object as soon as the prefill is done
        stats = pre.stats
        hit = bool(stats.hit)
        outcome = "off" if not use else ("hit" if hit else "miss")
        self.counters["hits" if hit else ("misses" if use else "reuse_off")] += 1
        self.m_requests.inc(tags={"outcome": outcome})
        if hit:
            self.m_hits.inc()
            if stats.reused_tokens:
                self.m_reused.inc(stats.reused_tokens)

        # register the prompt unless reuse is off, it is too short to ever be reused, or
        # it is exactly the entry we just reused (avoid duplicates)
        public_key = None
        same_as_ref = (res is not None and hit and res.ref_token_count == ids.size and res.similarity >= 0.9999
                       and store_key is None)
        register = use and ids.size >= self.engine.config.min_reuse_tokens and not same_as_ref
        if register:
            public_key = store_key or uuid.uuid4().hex
        elif same_as_ref:
            public_key = _public_key(res.key)

        max_new = int(req.get("max_new_tokens", 128))
        # temperatures near 0 overflow the softmax (logits / 5e-324 = inf -> NaN): they are greedy anyway
        temperature = float(req.get("temperature", 0.7))
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
        top_p = min(1.0, max(float(req.get("top_p", 0.9)), 1e-6))
        it = self.engine.decode(pre, max_new_tokens=max_new, temperature=temperature,
                                top_p=top_p, seed=req.get("seed"),
                                stop_on_eos=bool(req.get("stop_on_eos", True)))
        text = TextStream(self.engine)
        stops = StopMatcher([s for s in (req.get("stop") or []) if isinstance(s, str)])
        ttft_ms, n_out, last, finish = None, 0, None, None
        delay = self.args.fault_decode_delay_s
        while True:
            if delay and n_out:
                await asyncio.sleep(delay)  # fault injection: a slow replica
            tok = await asyncio.to_thread(next, it, _END)
            if tok is _END:
                break
            n_out += 1
            last = tok
            if ttft_ms is None:
                ttft_ms = (time.perf_counter() - t0) * 1e3
                self.m_ttft.observe(ttft_ms)
                if register:  # export before the next decode step touches the cache
                    self._spawn(self._register(_internal_key(tenant, public_key), vec, ids, pre, tenant))
            delta = stops.feed(text.push(tok))
            ev = {"type": "token", "id": tok, "text": delta}
            if n_out == 1:
                ev["replica"] = self.replica
            yield ev
            if stops.stopped:
                finish = "stop"
                break
        if not stops.stopped:
            tail = stops.feed(text.flush()) + (stops.flush() if not stops.stopped else "")
            if tail:
                yield {"type": "token", "id": None, "text": tail}
        if finish is None:
            finish = "stop" if (stops.stopped or (last is not None and last in self.engine.eos_ids)) else "length"
        yield {
            "type": "done", "text": stops.buf, "finish_reason": finish, "replica": self.replica,
            "model": self.model_name, "used_semshare": use, "cache_hit": hit,
            "ref_key": _public_key(res.key) if (res is not None and hit) else None,
            "retrieved_sim": float(res.similarity) if res is not None else None,
            "store_key": public_key, "fallback": fallback,
            "usage": {"prompt_tokens": int(ids.size), "completion_tokens": n_out,
                      "reused_tokens": int(stats.reused_tokens), "recomputed_tokens": int(stats.recomputed_tokens)},
            "timing": {"replica_ttft_ms": round(ttft_ms or 0.0, 3), "lookup_ms": round(t_lookup, 3),
                       "kv_fetch_ms": round(t_fetch, 3), "prefill_ms": round(stats.prefill_ms, 3),
                       "mapping_ms": round(stats.mapping_ms, 3), "gather_ms": round(stats.gather_ms, 3),
                       "replica_total_ms": round((time.perf_counter() - t0) * 1e3, 3)},
        }

    # ops -----------------------------------------------------------------------------
    async def info(self) -> dict:
        return {"replica": self.replica, "replica_actor_name": self.replica_actor_name, "model": self.model_name,
                "load_s": round(self.load_s, 3), "counters": dict(self.counters),
                "pending_registrations": len(self._pending), "semshare": self.engine.config.to_dict()}

    async def check_health(self) -> None:
        if self._closing:
            raise RuntimeError("replica is shutting down")
        if self.engine is None:
            raise RuntimeError("engine not loaded")

    async def __del__(self):
        """Graceful shutdown: let in-flight registrations finish (bounded), then release."""
        self._closing = True
        pending = list(self._pending)
        if pending:
            logger.info("LLMServer %s: waiting for %d registration(s)", self.replica, len(pending))
            await asyncio.wait(pending, timeout=10)
