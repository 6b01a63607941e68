"""`SemShareServer`: one model replica. Prefill with semantic KV reuse, stream tokens.

(Named so it does not collide with ``ray.serve.llm.LLMServer``; ``LLMServer`` remains
an alias for old imports.)

Per request (``generate``, an async generator of events, :mod:`serve_app.protocol`):

1. check the :class:`~serve_app.protocol.ReplicaRequest` the ingress prepared: token
   ids, retrieval vector and the index's answer are in it (the replica does not
   tokenize, fingerprint or look up again, except for an untokenized request);
2. get the reference KV ready (:class:`serve_app.reuse.ReusePath`): from the
   replica-local hot tier, or fetched from the object store, checked, converted and
   kept hot; any failure is a full prefill (counted, the entry reported if it is bad);
3. submit it to the replica's :class:`~semshare_core.scheduler.Scheduler`: one engine
   thread owns the model, admits requests within the budgets (``max_running``,
   ``max_step_tokens``, ``kv_budget_bytes``), prefills (a hit, a replay, or a full
   prefill in chunks) and runs ONE batched decode step for every running request.
   Events come back through an asyncio queue (``loop.call_soon_threadsafe``); no lock
   is held across requests, and a long prefill stalls decodes by at most a chunk;
4. once prefilled, the prompt's KV is exported in a worker thread (the decode runs on
   its own copy, so nothing waits for it) and registered while decoding runs; the
   registration is awaited before the final ``done`` event, so a ``store_key`` in a
   response is found by the next lookup (read-your-writes). Past the depth cap an exact
   re-prefill is registered after the response (awaited only for an explicit
   ``store_key``);
5. stream text deltas: tokens that piled up while the client read are sent as one
   event (``stream_interval_ms`` groups them on purpose); a disconnect, a timeout or a
   stop string cancels the request, freeing its slot and KV at the next step.

Events: ``error`` (client mistakes, sent instead of raising so the ingress can map them
to 4xx), ``token`` and a final ``done`` with usage, cache and timing facts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from typing import AsyncIterator, Optional

import torch
from ray import serve
from ray.serve import metrics

from semshare_core import SemShareEngine
from semshare_core.scheduler import GenParams, Request as SchedRequest, RequestRefused, Scheduler

from .detokenize import IncrementalDetokenizer
from .front import tokenizer_digest
from .protocol import (KEY_RE, MIN_TEMPERATURE, TENANT_RE, ClientError, ReplicaRequest, done_event,  # noqa: F401
                       error_event, internal_key, public_key, token_event)
from .reuse import IndexClient, ReusePath, index_namespace, signature_digest
from .settings import AppArgs, load_model
from .warmup import WarmupReport, warm_up

logger = logging.getLogger("ray.serve")

_internal_key, _public_key = internal_key, public_key  # old names


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


@serve.deployment(name="SemShareServer", health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=2)
class SemShareServer:
    def __init__(self, args: dict):
        self.args = AppArgs(**args)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        t0 = time.perf_counter()
        lm = load_model(self.args)
        self.model_name = self.args.served_model_name()
        self.engine = SemShareEngine(lm.model, lm.tokenizer, self.args.semshare_config(),
                                     decode_attention=self.args.decode_attention,
                                     compile_decode=self.args.compile_decode,
                                     compile_prefill=self.args.compile_prefill)
        logger.info("decode attention: %s (decode_attention=%s); decode step: %s (compile_decode=%s); full "
                    "prefill and hit layers: %s (compile_prefill=%s)",
                    f"native kernel {self.engine.decode_kernel.path.name}" if self.engine.decode_kernel else "SDPA",
                    self.args.decode_attention, "compiled" if self.engine.compiled_decode else "eager",
                    self.args.compile_decode, "compiled" if self.engine.compiled_prefill else "eager",
                    self.args.compile_prefill)
        self.tok_digest = tokenizer_digest(lm.tokenizer)
        self.sig_digest = signature_digest(self.engine.signature)
        self.load_s = time.perf_counter() - t0
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.replica_actor_name = ctx.replica_id.to_full_id_str()
        self.index = IndexClient(self.args, self.engine.config.fingerprint_dim,
                                 index_namespace(self.args, self.sig_digest))
        try:  # create / resolve the index actor now, so the first request does not wait for it
            self.index.resolve_now().ping.remote()
        except Exception as e:  # noqa: BLE001 - requests retry; the cache is optional
            logger.warning("index actor not available at start-up: %s", e)
        self._closing = False
        self.counters = {"requests": 0, "hits": 0, "hot_hits": 0, "cold_hits": 0, "misses": 0, "reuse_off": 0,
                         "index_unavailable": 0, "lost_objects": 0, "kv_mismatch": 0, "kv_corrupt": 0,
                         "reuse_error": 0, "registered": 0, "register_errors": 0, "active": 0,
                         "replica_lookups": 0, "refused": 0}
        self.reuse = ReusePath(self.engine, self.args, self.replica, self.index, self._fallback)
        self.reuse.start_kv_owner()  # this node's KV owner, running before the first registration
        self.scheduler = Scheduler(self.engine, self.args.scheduler_config(self.engine.device))
        self.scheduler.start()
        # before the constructor returns: Serve neither routes to the replica nor counts it
        # RUNNING (what the ingress's /ready checks) until then
        self.warmup: Optional[WarmupReport] = self._warm_up() if self.args.warmup else None
        self._metrics_task = None
        self.m_requests = metrics.Counter("semshare_requests", description="generation requests",
                                          tag_keys=("outcome",))
        self.m_hits = metrics.Counter("semshare_cache_hits", description="requests that reused a cached KV",
                                      tag_keys=("tier",))
        self.m_staging = metrics.Counter("semshare_reference_staging", tag_keys=("path",),
                                         description="how hits' reference rows reached the model: device (hot "
                                         "tier), layered / whole (pinned host staging), cpu, replay")
        self.m_reused = metrics.Counter("semshare_reused_tokens", description="prompt tokens taken from a cache")
        self.m_fallbacks = metrics.Counter("semshare_reuse_fallbacks", tag_keys=("reason",),
                                           description="reuse attempts that fell back to a full prefill")
        self.m_ttft = metrics.Histogram("semshare_ttft_ms", description="time to first token (replica side)",
                                        boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000])
        self.m_running = metrics.Gauge("semshare_running_requests", description="requests admitted by the "
                                       "scheduler (prefilling or decoding)")
        self.m_waiting = metrics.Gauge("semshare_waiting_requests", description="requests waiting for admission")
        self.m_kv = metrics.Gauge("semshare_kv_bytes", description="KV bytes held by admitted requests")
        self.m_batch = metrics.Histogram("semshare_decode_batch_size", description="requests per decode step",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.m_step = metrics.Histogram("semshare_step_ms", description="scheduler step time (prefill work + "
                                        "one batched decode)", boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500])
        self.m_tokens = metrics.Counter("semshare_generated_tokens", description="tokens decoded (rate: tokens/s)")
        self.m_index_bytes = metrics.Gauge("semshare_index_bytes", description="KV bytes held by the index")
        self.m_hot_bytes = metrics.Gauge("semshare_hot_tier_bytes", description="replica-local hot KV bytes")
        logger.info("SemShareServer %s loaded %s in %.1fs (hot tier %d bytes)", self.replica, self.model_name,
                    self.load_s, self.reuse.hot.max_bytes)

    def _warm_up(self) -> WarmupReport:
        """The engine's first-call costs, paid now (:mod:`serve_app.warmup`); a failure of the
        full prefill or decode stops the replica from starting (it could serve nothing)."""
        try:
            rep = warm_up(self.engine, self.scheduler)
        except Exception:
            self.scheduler.stop()
            raise
        def compiled(c, secs):
            return "eager" if c is None else (f"compiled in {secs:.1f}s" if c.active
                                              else f"eager (compile failed: {c.failed})")
        logger.info("SemShareServer %s warmed up in %.0f ms: full prefill of %d tokens, %d decode steps, hit "
                    "path %s, decode step %s, full prefill and hit layers %s", self.replica, rep.ms, rep.prompt_tokens,
                    rep.decode_steps, f"ran ({rep.staging})" if rep.hit else f"did not run ({rep.hit_error or 'no hit'})",
                    compiled(self.engine.compiled_decode, rep.compile_s or 0.0),
                    compiled(self.engine.compiled_prefill, rep.compile_prefill_s or 0.0))
        return rep

    def _fallback(self, reason: str) -> str:
        self.counters[reason] = self.counters.get(reason, 0) + 1
        self.m_fallbacks.inc(tags={"reason": reason})
        return reason

    # request -------------------------------------------------------------------------
    async def _prepare_here(self, req: ReplicaRequest):
        """An untokenized request (the ingress had no tokenizer): do the ingress's work."""
        from .front import PromptCodec

        codec = PromptCodec(self.engine.tokenizer, self.engine.config)
        ids = await asyncio.to_thread(codec.tokenize, req.prompt, req.messages, self.args.max_prompt_tokens)
        ref, fallback, t_lookup = None, None, 0.0
        vec = self.engine.fingerprint(ids) if req.use_semshare else None
        if req.use_semshare:
            self.counters["replica_lookups"] += 1
            threshold = req.sim_threshold if req.sim_threshold is not None else self.engine.config.sim_threshold
            ts = time.perf_counter()
            ref, fallback, more = await self.index.lookup(vec, req.tenant, float(threshold), ids,
                                                          self.engine.config.max_sources)
            req.more_sources = more
            t_lookup = (time.perf_counter() - ts) * 1e3
        return ids, vec, ref, fallback, t_lookup

    async def generate(self, req: ReplicaRequest) -> AsyncIterator[dict]:
        """Stream events for one request (see module docstring)."""
        self.counters["active"] += 1
        try:
            async for ev in self._generate(req):
                yield ev
        finally:  # also on cancellation (client gone, request timeout)
            self.counters["active"] -= 1

    async def _generate(self, req: ReplicaRequest) -> AsyncIterator[dict]:
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        try:
            if not isinstance(req, ReplicaRequest):
                raise ClientError(f"replicas take a ReplicaRequest, not a {type(req).__name__}", 500, "internal_error")
            req.check(self.args.max_prompt_tokens, self.engine.signature.vocab_size)
            if req.ids is not None:
                if req.tokenizer_digest is not None and req.tokenizer_digest != self.tok_digest:
                    raise ClientError("the ingress tokenized with another tokenizer than this replica's", 500,
                                      "internal_error")
                ids, vec, ref, fallback, t_lookup = req.ids, req.vector, req.reference, req.lookup_fallback, \
                    req.lookup_ms
            else:
                ids, vec, ref, fallback, t_lookup = await self._prepare_here(req)
        except ClientError as e:
            yield error_event(e)
            return
        use = bool(req.use_semshare)
        if use and vec is None:
            vec = self.engine.fingerprint(ids)
        if fallback:
            self._fallback(fallback)
        if not use:
            ref = None

        # references -> the scheduler (prefill, then batched decode on the engine thread).
        # Several sources (a prompt whose parts are cached in different entries) are
        # fetched concurrently; the ones that fail are left out (counted, reported).
        refs = ([ref] + list(req.more_sources or [])) if ref is not None else []
        got = await asyncio.gather(*(self.reuse.acquire(r) for r in refs)) if refs else []
        readies = [rd for rd, _ in got if rd is not None]
        fallback = fallback or next((fb for _, fb in got if fb), None)
        ready = readies[0] if readies else None
        several = len(readies) > 1
        if ready is not None and ready.ref is not ref:
            ref = ready.ref  # the best entry was unusable: the next one leads
        s = req.sampling.normalized()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sreq = SchedRequest(ids, GenParams(s.max_new_tokens, s.temperature, s.top_p, s.seed, s.stop_on_eos),
                            lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                            reference=ready.packed if ready and not several else None,
                            reference_kv=ready.kv if ready and not several else None,
                            sources=[rd.packed for rd in readies] if several else None,
                            sources_kv=[rd.kv for rd in readies] if several else None,
                            early_first_token=True)
        self._ensure_metrics_task()
        try:
            self.scheduler.submit(sreq)
        except RequestRefused as e:
            self.counters["refused"] += 1
            yield error_event(ClientError(str(e), 503 if e.retryable else 400,
                                          "overloaded" if e.retryable else "context_length_exceeded"))
            return
        finished = False
        try:
            async for ev in self._stream(req, sreq, events, ids, vec, ref, readies, fallback, use, t0, t_lookup):
                yield ev
            finished = True
        finally:
            if not finished:  # client gone, timeout or error: free the slot and KV at the next step
                self.scheduler.cancel(sreq.id)

    async def _stream(self, req: ReplicaRequest, sreq, events: asyncio.Queue, ids, vec, ref, readies, fallback, use,
                      t0: float, t_lookup: float) -> AsyncIterator[dict]:
        ready = readies[0] if readies else None
        text = IncrementalDetokenizer(self.engine.tokenizer)  # linear in the output (TextStream re-decodes)
        stops = StopMatcher(list(req.sampling.normalized().stop))
        ttft_ms, n_out, last, finish = None, 0, None, None
        last_yield = 0.0
        kind, pre = await events.get()
        if kind == "token":  # an identical repeat's first token, sent at submit (Scheduler._early_token)
            n_out, last = 1, pre
            ttft_ms = (time.perf_counter() - t0) * 1e3
            self.m_ttft.observe(ttft_ms)
            yield token_event(pre, stops.feed(text.push(pre)), self.replica, [pre])
            last_yield = time.perf_counter()
            kind, pre = await events.get()
        if kind == "error":
            if isinstance(pre, (RequestRefused, MemoryError, torch.OutOfMemoryError)):  # retryable: 503
                logger.warning("request refused before its prefill: %s: %s", type(pre).__name__, pre)
                yield error_event(ClientError(f"server busy ({type(pre).__name__}), retry later", 503, "overloaded"))
                return
            raise pre
        if kind != "prefilled":
            raise RuntimeError(f"scheduler sent {kind!r} before the prefill")
        if sreq.reuse_error is not None and ready is not None:
            fallback, ready = self.reuse.reuse_failed(ready, sreq.reuse_error), None
        for rd in readies:
            rd.release()  # stop borrowing the objects (and reading them in place) once prefilled
        stats = pre.stats
        hit = bool(stats.hit) and ready is not None
        per_source, src_depth = None, ref.depth if ref is not None else 0
        if len(readies) > 1 and stats.sources:  # several sources: who gave what, who was dropped
            per_source = []
            for rec in stats.sources:
                rd = readies[rec["index"]]
                if rec.get("dropped"):
                    self.spawn_report(rd, rec["dropped"])
                per_source.append({"key": public_key(rd.ref.key), "tier": rd.tier,
                                   "similarity": round(float(rd.ref.similarity), 4), "reused_tokens": int(rec["rows"]),
                                   "exact_tokens": int(rec["exact"]), "dropped": rec.get("dropped")})
            used = [readies[rec["index"]].ref.depth for rec in stats.sources if rec.get("used")]
            src_depth = max(used) if used else src_depth
        tier = ready.tier if hit else None
        outcome = "off" if not use else ("hit" if hit else "miss")
        self.counters["hits" if hit else ("misses" if use else "reuse_off")] += 1
        if tier:
            self.counters[f"{tier}_hits"] += 1
        self.m_requests.inc(tags={"outcome": outcome})
        if hit:
            self.m_hits.inc(tags={"tier": tier})
            self.m_staging.inc(tags={"path": stats.staging or "replay"})
            if stats.reused_tokens:
                self.m_reused.inc(stats.reused_tokens)

        # registration: unless reuse is off, the prompt is too short to ever be reused, or
        # it is exactly the entry just reused (no duplicates); past the depth cap only an
        # exact prefill is registered (policy "refresh", or an explicit store_key)
        store_key = req.store_key
        public, export, refresh = None, None, False
        same_as_ref = (hit and ref.ref_token_count == ids.size and ref.similarity >= 0.9999 and store_key is None)
        register = use and ids.size >= self.engine.config.min_reuse_tokens and not same_as_ref
        depth, past_cap = self.reuse.plan_depth(pre, dataclasses.replace(ref, depth=src_depth) if hit else None)
        if register and past_cap:
            if self.args.depth_cap_policy == "refresh" or store_key is not None:
                refresh, depth = True, 0
            else:
                register = False
                self.reuse.counters["not_registered_depth"] += 1
        if register:
            public = store_key or uuid.uuid4().hex
            if not refresh:
                export = self.reuse.start_export(pre)  # the decode works on its own copy of the KV
        elif same_as_ref:
            public, depth = public_key(ref.key), ref.depth
        else:
            depth = None
        if export is None:
            pre.release_full_kv()
        reg_task = None
        key = internal_key(req.tenant, public) if register else None
        if export is not None:
            reg_task = self.reuse.spawn(self.reuse.register(key, vec, ids, req.tenant, depth, export))
        del pre

        interval = self.args.stream_interval_ms / 1e3
        if stops.stopped:  # the early first token already matched a stop string
            finish = "stop"
            self.scheduler.cancel(sreq.id)
        while finish is None:
            batch = [await events.get()]
            if interval and n_out and req.stream and batch[0][0] == "token":  # group tokens: fewer stream items
                wait = last_yield + interval - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            while not events.empty():
                batch.append(events.get_nowait())
            toks = []
            for kind, val in batch:
                if kind == "token":
                    toks.append(val)
                elif kind == "finished":
                    finish = "stop" if val == "stop" else ("length" if val == "length" else val)
                elif kind == "error":
                    raise val
            if not toks:
                continue
            piece = "".join(text.push(t) for t in toks)
            first = n_out == 0
            n_out += len(toks)
            last = toks[-1]
            if ttft_ms is None:
                ttft_ms = (time.perf_counter() - t0) * 1e3
                self.m_ttft.observe(ttft_ms)
            delta = stops.feed(piece)
            if first or req.stream:  # a non-streaming caller reads the first event and the done only
                yield token_event(last, delta, self.replica if first else None, toks)
                last_yield = time.perf_counter()
            if stops.stopped:
                finish = "stop"
                self.scheduler.cancel(sreq.id)  # a stop string: free the slot now
        if not stops.stopped:
            tail = stops.feed(text.flush()) + stops.flush()
            if tail and req.stream:
                yield token_event(None, tail)
        if finish not in ("stop", "length"):
            finish = "stop" if (last is not None and last in self.engine.eos_ids) else "length"

        # read-your-writes: the entry is in the index before the response names it. A
        # refresh (an exact re-prefill past the depth cap) is awaited only for an explicit
        # store_key; otherwise it runs after the response, which never waits for it.
        t_reg = time.perf_counter()
        reg = None
        if refresh and store_key is not None:
            reg = await self._register_exact(key, vec, ids, req.tenant)
        elif refresh:
            self.reuse.spawn(self._register_exact(key, vec, ids, req.tenant))
            public, depth = None, None
        elif reg_task is not None:
            reg = await asyncio.shield(reg_task)
        reg_wait = (time.perf_counter() - t_reg) * 1e3
        if reg is not None:
            if reg.get("stored"):
                self.counters["registered"] += 1
                self.m_index_bytes.set(reg.get("index_bytes", 0))
            else:
                self.counters["register_errors"] += reg.get("reason") != "larger than the byte cap"
                public, depth = None, None
        self.m_hot_bytes.set(self.reuse.hot.nbytes)
        timing = {"replica_ttft_ms": round(ttft_ms or 0.0, 3), "lookup_ms": round(t_lookup, 3),
                  "queue_ms": round(max(0.0, ((sreq.first_token_at or t0) - sreq.submitted_at) * 1e3
                                        - stats.prefill_ms - stats.gather_ms - stats.mapping_ms), 3),
                  "kv_fetch_ms": round(ready.fetch_ms if ready else 0.0, 3),
                  "kv_check_ms": round(ready.check_ms if ready else 0.0, 3),
                  "kv_convert_ms": round(ready.convert_ms if ready else 0.0, 3),
                  "prefill_ms": round(stats.prefill_ms, 3), "mapping_ms": round(stats.mapping_ms, 3),
                  "gather_ms": round(stats.gather_ms, 3), "export_wait_ms": 0.0, "staging": stats.staging,
                  "register_ms": round(reg["register_ms"], 3) if reg else None,
                  "register_wait_ms": round(reg_wait, 3),
                  "replica_total_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        yield done_event(
            text=stops.buf, finish_reason=finish, replica=self.replica, model=self.model_name, used_semshare=use,
            cache_hit=hit, cache_tier=tier, ref_key=public_key(ref.key) if hit else None,
            ref_depth=ref.depth if hit else None,
            retrieved_sim=float(ref.similarity) if ref is not None else None, store_key=public, depth=depth,
            fallback=fallback,
            usage={"prompt_tokens": int(ids.size), "completion_tokens": n_out,
                   "reused_tokens": int(stats.reused_tokens) if hit else 0,
                   "recomputed_tokens": int(stats.recomputed_tokens) if hit else int(ids.size),
                   **({"sources": per_source} if per_source else {})},
            timing=timing)

    def spawn_report(self, rd, why: str) -> None:
        """A source the engine dropped (another model, malformed): reported like a bad cold fetch."""
        self.reuse.spawn(self.reuse.report_bad(rd.ref, "mismatch" if "signature" in why or "model" in why
                                               else "corrupt"))
        self._fallback("kv_mismatch" if "signature" in why else "kv_corrupt")

    async def _register_exact(self, key: str, vec, ids, tenant: str) -> dict:
        """Past the depth cap: a full prefill's KV is registered instead (depth 0), prefilled
        by the scheduler like any request (prefill only)."""
        self.reuse.counters["refreshed_exact"] += 1
        loop = asyncio.get_running_loop()
        got: asyncio.Future = loop.create_future()

        def sink(ev):
            def put():
                if not got.done():
                    if ev[0] == "prefilled":
                        got.set_result(ev[1])
                    elif ev[0] == "error":
                        got.set_exception(ev[1])
            loop.call_soon_threadsafe(put)

        try:
            self.scheduler.submit(SchedRequest(ids, GenParams(max_new_tokens=0), sink))
            pre = await got
        except Exception as e:  # noqa: BLE001 - the index is an optimisation
            logger.warning("exact refresh of %s failed: %s: %s", key, type(e).__name__, e)
            return {"key": key, "stored": False, "reason": type(e).__name__, "register_ms": 0.0}
        return await self.reuse.register(key, vec, ids, tenant, 0, self.reuse.start_export(pre))

    # metrics -------------------------------------------------------------------------
    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None or self._metrics_task.done():
            self._metrics_task = asyncio.get_running_loop().create_task(self._flush_metrics())

    async def _flush_metrics(self) -> None:
        """Every second: the scheduler's step records into Serve metrics (the engine thread
        never calls the metrics client)."""
        seen = 0
        while not self._closing:
            await asyncio.sleep(1.0)
            try:
                steps = self.scheduler.counters["steps"]
                new = min(steps - seen, len(self.scheduler.history))
                recs = list(self.scheduler.history)[-new:] if new > 0 else []
                seen = steps
                for r in recs:
                    if r.batch:
                        self.m_batch.observe(r.batch)
                    self.m_step.observe(r.ms)
                    if r.decoded:
                        self.m_tokens.inc(r.decoded)
                st = self.scheduler.stats()
                self.m_running.set(st["running"] + st["prefilling"])
                self.m_waiting.set(st["waiting"])
                self.m_kv.set(st["kv_bytes"])
            except Exception as e:  # noqa: BLE001 - metrics must never break serving
                logger.info("metrics flush failed: %s", e)

    # ops -----------------------------------------------------------------------------
    async def model_signature(self) -> str:
        """Digest of the model signature (the default index namespace is derived from it)."""
        return self.sig_digest

    async def info(self) -> dict:
        return {"replica": self.replica, "replica_actor_name": self.replica_actor_name, "model": self.model_name,
                "load_s": round(self.load_s, 3), "counters": dict(self.counters), "reuse": self.reuse.stats(),
                "pending_registrations": len(self.reuse.pending), "semshare": self.engine.config.to_dict(),
                "scheduler": self.scheduler.stats(),
                "decode_attention": "native" if self.engine.decode_kernel is not None else "sdpa",
                "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                "native_gather": self.engine.gather_kernel is not None,
                "compile_decode": self._compile_state(self.engine.compiled_decode, self.args.compile_decode,
                                                      "compiled_steps"),
                "compile_prefill": self._compile_state(self.engine.compiled_prefill, self.args.compile_prefill,
                                                       "compiled_chunks"),
                "compile_hit_layers": self._compile_state(self.engine.compiled_selective, self.args.compile_prefill,
                                                          "compiled_layers"),
                "warmup": self.warmup.as_dict() if self.warmup is not None else {"ran": False}}

    def _compile_state(self, compiled, mode: str, counter: str) -> dict:
        """``info()``'s view of a compiled pass (``compiled``: the engine's, or None when off)."""
        if compiled is None:
            return {"mode": mode, "active": False}
        return {"mode": mode, "active": compiled.active, "failed": compiled.failed, counter: getattr(compiled, counter)}

    def record_routing_stats(self) -> dict:
        """Shipped to routers (``replica.routing_stats``): the hot tier's fill."""
        return {"hot_bytes": self.reuse.hot.nbytes, "hot_entries": len(self.reuse.hot)}

    async def check_health(self) -> None:
        if self._closing:
            raise RuntimeError("replica is shutting down")
        if self.engine is None:
            raise RuntimeError("engine not loaded")
        thread = self.scheduler._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    async def __del__(self):
        """Graceful shutdown: let in-flight registrations finish (bounded), then release."""
        self._closing = True
        pending = list(self.reuse.pending)
        if pending:
            logger.info("SemShareServer %s: waiting for %d registration(s)", self.replica, len(pending))
            await asyncio.wait(pending, timeout=10)
        await asyncio.to_thread(self.scheduler.stop)


LLMServer = SemShareServer  # old name (collides with ray.serve.llm.LLMServer: prefer SemShareServer)
