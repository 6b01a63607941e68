"""`SemShareEngine`: the façade the server and the benchmarks call.

    engine = SemShareEngine(model, tokenizer, SemShareConfig())
    ids = engine.encode("...")
    vec = engine.fingerprint(ids)                   # index key
    pre = engine.prefill(ids, reference=packed_kv)  # packed_kv: PackedKV or None
    for tok in engine.decode(pre, max_new_tokens=64, temperature=0.0): ...
    packed = engine.export_kv(pre)                  # register for later prompts

Reuse off or no reference: the prefill and decode go through ``model.forward`` with a
``DynamicCache``, exactly as ``model.generate`` does. A reference runs the
selective-recompute prefill (:mod:`semshare_core.prefill`).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .config import SemShareConfig
from .families import family_of
from .fingerprint import prompt_vector, token_embeddings
from .kv import KVFormatError, KVMismatchError, ModelSignature, PackedKV
from .matching import ReferenceLSH, TokenMapping, map_tokens
from .sources import SourceMapping, map_sources
from .prompts import encode_chat, encode_text
from .staging import HostStaging, ImmediateFeed, LayerFeed, PinnedSlots
from .prefill import full_length_cache, full_prefill, probe_runs, selective_prefill
from .prepack import prepack_linears
from .compiled_decode import CompiledDecode, wanted as compile_wanted
from .compiled_prefill import CompiledPrefill
from .compiled_selective import CompiledSelective
from .decode_kernel import resolve as resolve_decode_kernel
from .gather_kernel import load as load_gather_kernel
from .pruning import layer_budgets, pruned_cache, retained_indices
from .rope import Rerotator

logger = logging.getLogger(__name__)


@dataclass
class PrefillStats:
    """What a prefill did. Times in milliseconds.

    ``gather_ms``: time to make the reference ready before the layer loop (with
    ``staging`` "layered": layers 0 and 1 only; the other layers' fetch and re-rotation
    run inside the loop and count in ``prefill_ms``). ``staging``: how a hit's reference
    rows reached the model: "device" (``reference_kv`` given), "whole" (one pinned
    buffer), "layered" (per layer, :class:`semshare_core.staging.LayerFeed`), "cpu"
    (plain host gather); "" on a miss or a replay.

    ``sources`` (only from :meth:`SemShareEngine.prefill_multi`): one dict per source given,
    in the caller's order: ``index`` (position in the caller's list), ``tokens`` (its
    length), ``rows`` (prompt tokens mapped to it), ``exact`` (of which exactly, by
    token id), ``used`` (whether the hit read it), ``dropped`` (why it was not used:
    signature mismatch, malformed, over ``max_sources``...; None if used or unused).
    """

    prompt_tokens: int
    hit: bool = False
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    rows_per_layer: list[int] = field(default_factory=list)
    probe_rows: int = 0
    retained_per_layer: list[int] = field(default_factory=list)
    mapping: dict[str, int] = field(default_factory=dict)
    mapping_ms: float = 0.0
    gather_ms: float = 0.0
    prefill_ms: float = 0.0
    staging: str = ""
    sources: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PrefillResult:
    """A prefilled prompt, ready to decode.

    ``logits``: float32 ``[vocab]`` for the last prompt token. ``cache``: the decode
    cache (pruned per layer on hits with retention < 1). ``keys``/``values``: the
    prompt's full KV per layer, ``[1, H, n, D]`` (export source).
    """

    ids: np.ndarray
    logits: torch.Tensor
    cache: object
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    stats: PrefillStats
    mapping: TokenMapping | SourceMapping | None = None  # SourceMapping: a several-source hit
    explicit_positions: bool = False
    exact: bool = False  # keys/values/logits are exactly a full prefill's
    kept: list[torch.Tensor] | None = None  # pruned: the positions each layer of ``cache`` holds

    def release_full_kv(self) -> None:
        """Drop the references to the prompt's full KV (``keys``/``values``).

        On a hit they are buffers of their own (the decode cache holds copies, pruned
        when retention < 1): once exported they are dead weight during decode. Called by
        :meth:`SemShareEngine.decode` before its first decode step.
        """
        self.keys, self.values = [], []


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when ``temperature <= 0``; else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cut = torch.cumsum(sp, 0) - sp >= top_p  # drop tokens once the kept mass reaches top_p
        sp = sp.masked_fill(cut, 0.0)
        choice = torch.multinomial(sp / sp.sum(), 1, generator=generator)
        return int(si[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _own_ids(ids) -> np.ndarray:
    """int64 ``[n]`` ids in writable memory: ids that came through Ray are read-only views of
    the object store, which ``torch.from_numpy`` accepts only with a UserWarning per call."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids if ids.flags.writeable else ids.copy()


class SemShareEngine:
    """One model + tokenizer + config. Thread-safe: calls are serialised by a lock."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: SemShareConfig | None = None,
                 prepack: bool = True, decode_attention: str = "auto", compile_decode: str = "off",
                 compile_prefill: str = "off"):
        """``prepack``: on a CPU with bf16 weights, decode-sized matmuls use weights re-laid
        out once for oneDNN (:mod:`semshare_core.prepack`; same results, ~2x faster).
        ``decode_attention``: ``auto`` (bf16 on a CPU with AVX512-BF16: the native kernel of
        :mod:`semshare_core.decode_kernel`, else SDPA), ``native`` (that kernel or an error),
        ``sdpa`` (always SDPA: bf16 decode bit-identical to ``model.generate``).
        ``compile_decode``: batched decode steps as one compiled graph
        (:mod:`semshare_core.compiled_decode`): ``auto`` (bf16 on a CPU with a C++ compiler),
        ``on``, ``off`` (the default here; the server's default is ``auto``).
        ``compile_prefill``: full prefills (and their chunks) as one compiled graph
        (:mod:`semshare_core.compiled_prefill`), same modes and defaults."""
        self.family = family_of(model)  # UnsupportedModelError names what the method cannot do
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or SemShareConfig()
        self.rerotate = Rerotator(model)
        self.signature = ModelSignature.of(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = model.config.num_hidden_layers
        eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        self.lock = threading.RLock()
        self._lsh_cache: OrderedDict[tuple, ReferenceLSH] = OrderedDict()
        self.staging = HostStaging(self.device)
        self.layer_slots = PinnedSlots(self.device)
        self.prepacked = prepack_linears(model) if prepack else 0
        self.decode_kernel = resolve_decode_kernel(decode_attention, self.device, self.dtype)
        self.compiled_decode = CompiledDecode(model) if compile_wanted(compile_decode, self.device, self.dtype) else None
        self.compiled_prefill = (CompiledPrefill(model) if compile_wanted(compile_prefill, self.device, self.dtype,
                                                                          "compile_prefill") else None)
        self.compiled_selective = CompiledSelective(model) if self.compiled_prefill is not None else None
        # one pass for a hit's host gather + key re-rotation (same bits as the torch path)
        self.gather_kernel = (load_gather_kernel() if self.device.type == "cpu" and self.dtype == torch.bfloat16
                              and self.rerotate.fast else None)

    def _full_forward(self, ids: torch.Tensor, cache=None):
        """:func:`~semshare_core.prefill.full_prefill` of ``ids`` after ``cache``'s rows, compiled
        where :attr:`compiled_prefill` is on."""
        if self.compiled_prefill is not None:
            return self.compiled_prefill.forward(ids, cache)
        return full_prefill(self.model, ids, cache)

    def warm_compiled_prefill(self) -> Optional[float]:
        """Compile the full prefill and the hits' layer graph now (a short throwaway prompt in
        two chunks, then a selective pass over its own KV): seconds taken, or None when they
        are off. A failed compile leaves that pass eager (logged)."""
        if self.compiled_prefill is None:
            return None
        t0 = time.perf_counter()
        with self.lock, torch.inference_mode():
            ids = torch.arange(1, 17, dtype=torch.long) % max(2, self.signature.vocab_size - 1) + 1
            _, cache = self.compiled_prefill.forward(ids[:9])
            self.compiled_prefill.forward(ids[9:], cache)
            if self.compiled_selective is not None:
                kv = torch.stack([torch.stack([cache.layers[l].keys[0], cache.layers[l].values[0]])
                                  for l in range(self.num_layers)])              # [L, 2, H, 16, D]
                cfg = self.config.with_(recompute_ratio=0.5, recompute_min_tokens=0, window=2, retention=1.0)
                selective_prefill(self.model, ids, kv, torch.zeros(ids.numel(), dtype=torch.bool), cfg,
                                  compiled=self.compiled_selective)
        return time.perf_counter() - t0

    def decode_step(self, seqs, tokens) -> torch.Tensor:
        """One batched decode step (:func:`semshare_core.batch.batch_step`'s contract), compiled
        where :attr:`compiled_decode` is on. Call with :attr:`lock` held."""
        if self.compiled_decode is not None:
            return self.compiled_decode.step(seqs, tokens, self.decode_kernel)
        from .batch import batch_step

        return batch_step(self.model, seqs, tokens, self.decode_kernel)

    def warm_compiled_decode(self) -> Optional[float]:
        """Compile the batched decode step now (two short throwaway requests, two steps),
        so the first real batch does not wait for it: seconds taken, or None when the
        compiled step is off. A failed compile leaves it off (logged)."""
        if self.compiled_decode is None:
            return None
        t0 = time.perf_counter()
        ids = np.arange(8, dtype=np.int64) % max(2, self.signature.vocab_size - 1) + 1
        with self.lock, torch.inference_mode():
            seqs = [self.decode_state(self.prefill(ids[: 8 - i])) for i in range(2)]
            for _ in range(2):
                self.compiled_decode.step(seqs, [1, 2], self.decode_kernel)
        return time.perf_counter() - t0

    # prompts ---------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        return encode_text(self.tokenizer, text)

    def encode_chat(self, messages: Sequence[dict]) -> np.ndarray:
        return encode_chat(self.tokenizer, messages)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self, ids: np.ndarray) -> np.ndarray:
        """Retrieval vector ``float32 [fingerprint_dim]`` (unit norm)."""
        return prompt_vector(ids, self.config.ngram, self.config.fingerprint_dim)

    # prefill ---------------------------------------------------------------------
    def prefill(self, ids: np.ndarray, reference: PackedKV | None = None,
                config: SemShareConfig | None = None, reference_kv: torch.Tensor | None = None,
                chunk: int | None = None) -> PrefillResult:
        """Prefill ``ids`` ``[n]``; with ``reference`` reuse its KV (selective recompute).

        ``reference_kv``: optionally ``reference``'s KV already on the engine's device,
        ``[L, 2, H, m, D]`` (e.g. a hot entry kept on the GPU): the gather then runs there
        instead of on the host copy. ``chunk``: a full prefill runs in chunks of that many
        tokens (:meth:`prefill_steps`, as the scheduler runs it under load); None: one piece.
        """
        steps = self.prefill_steps(ids, reference, config, reference_kv, chunk=chunk)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, ids: np.ndarray, reference: PackedKV | None = None,
                      config: SemShareConfig | None = None, reference_kv: torch.Tensor | None = None,
                      chunk: int | None = None, sources: Sequence[PackedKV] | None = None,
                      sources_kv: Sequence[torch.Tensor | None] | None = None) -> Iterator[int]:
        """:meth:`prefill` in units of work, for a scheduler that interleaves them with decode steps.

        A generator: between two units it yields the number of prompt tokens the unit
        processed (the caller may run other work then); it returns the
        :class:`PrefillResult` after the last unit. A full prefill runs in chunks of
        ``chunk`` tokens (``None``: one chunk) through ``model.forward`` on one
        ``DynamicCache``, as ``generate`` does with ``prefill_chunk_size``; a hit or a
        replay is one unit, and so is a hit on several ``sources`` (:meth:`prefill_multi`).
        """
        cfg = config or self.config
        ids = _own_ids(ids)
        if ids.size == 0:
            raise ValueError("empty prompt")
        if sources:  # several references: one unit (:meth:`prefill_multi`)
            return self.prefill_multi(ids, sources, cfg, sources_kv)
        if reference is not None and ids.size >= cfg.min_reuse_tokens and reference.seq_len > 0:
            with self.lock, torch.inference_mode():
                self.signature.check(reference.signature)
                if (cfg.replay_exact and reference.last_logits is not None
                        and np.array_equal(reference.token_ids, ids)):
                    res = self._replay(ids, reference, reference_kv)
                else:
                    res = self._prefill_hit(ids, reference, cfg, reference_kv)
            return res
        if chunk is None or chunk >= ids.size:
            with self.lock, torch.inference_mode():
                return self._full(ids)
        cache, ms = full_length_cache(), 0.0  # every row, also with a sliding window (export needs them)
        t = torch.from_numpy(ids)
        logits = None
        for a in range(0, int(ids.size), chunk):
            b = min(int(ids.size), a + chunk)
            with self.lock, torch.inference_mode():
                t0 = time.perf_counter()
                logits, cache = self._full_forward(t[a:b], cache)
                ms += (time.perf_counter() - t0) * 1e3
            if b < ids.size:
                yield b - a
        return self._full_result(ids, logits, cache, ms)

    def _full(self, ids: np.ndarray, mapping_ms: float = 0.0) -> PrefillResult:
        """A plain full prefill (``model.forward``, exactly what ``generate`` does; compiled
        where :attr:`compiled_prefill` is on)."""
        t0 = time.perf_counter()
        logits, cache = self._full_forward(torch.from_numpy(ids))
        return self._full_result(ids, logits, cache, (time.perf_counter() - t0) * 1e3, mapping_ms)

    def _full_result(self, ids: np.ndarray, logits: torch.Tensor, cache, ms: float,
                     mapping_ms: float = 0.0) -> PrefillResult:
        n = int(ids.size)
        stats = PrefillStats(prompt_tokens=n, recomputed_tokens=n, rows_per_layer=[n] * self.num_layers,
                             retained_per_layer=[n] * self.num_layers, mapping_ms=mapping_ms, prefill_ms=ms)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return PrefillResult(ids, logits, cache, keys, values, stats, exact=True)

    def planned_rows(self, n: int, forced: int, cfg: SemShareConfig) -> int:
        """Rows a hit with ``forced`` must-recompute rows (unmatched + last window) would
        compute at most, summed over layers, the layer-1 probe included (a full prefill: ``n * L``)."""
        L = self.num_layers
        probe = n if L > 1 else 0
        return n + probe + sum(cfg.layer_budget(l, n, forced) for l in range(1, L))  # + layer 0 on every token

    def _replay(self, ids: np.ndarray, reference: PackedKV, reference_kv: torch.Tensor | None) -> PrefillResult:
        """Identical prompt: the reference's KV and first-token logits, no prefill.

        With an exact reference (a full prefill's) decoding runs on a cache holding exactly
        what a full prefill computes, so the output equals a full prefill's; with a hit's
        KV it reproduces that hit's answer (and the result is not ``exact``).
        """
        t0 = self._clock()
        kv = (reference_kv if reference_kv is not None else reference.to_torch("cpu")).to(self.device, self.dtype)
        cache = full_length_cache()  # all n rows per layer, also with a sliding window (export needs them)
        for l in range(self.num_layers):  # update() copies (torch.cat): the reference stays untouched
            cache.update(kv[l, 0].unsqueeze(0), kv[l, 1].unsqueeze(0), l)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        logits = torch.from_numpy(np.array(reference.last_logits, dtype=np.float32))
        n, L = int(ids.size), self.num_layers
        stats = PrefillStats(prompt_tokens=n, hit=True, reused_tokens=n, recomputed_tokens=0, rows_per_layer=[0] * L,
                             retained_per_layer=[n] * L, mapping={"exact_span": n, "exact_token": 0, "fuzzy": 0, "none": 0},
                             gather_ms=(self._clock() - t0) * 1e3)
        return PrefillResult(ids, logits, cache, keys, values, stats, exact=bool(getattr(reference, "exact", True)))

    def _embed(self, ids: np.ndarray) -> torch.Tensor:
        """E-cache rows of ``ids`` ``[k]``: float32 ``[k, hidden]`` on the CPU."""
        return token_embeddings(self.model, torch.from_numpy(np.ascontiguousarray(ids))).cpu()

    def _reference_lsh(self, reference: PackedKV, cfg: SemShareConfig) -> ReferenceLSH:
        """The reference's LSH tables, built once per reference (LRU of a few): each hit
        otherwise re-embedded and re-hashed every reference token (~0.5 s at 16k tokens
        with a 4096-wide embedding, on the host CPU)."""
        key = (hashlib.blake2b(np.ascontiguousarray(reference.token_ids).tobytes(), digest_size=16).digest(),
               cfg.lsh_bits, cfg.lsh_tables, cfg.seed)
        lsh = self._lsh_cache.pop(key, None)
        if lsh is None:
            lsh = ReferenceLSH(reference.token_ids, self._embed, cfg.lsh_bits, cfg.lsh_tables, cfg.seed)
        self._lsh_cache[key] = lsh
        while len(self._lsh_cache) > 16:
            self._lsh_cache.popitem(last=False)
        return lsh

    def map_to_reference(self, ids: np.ndarray, reference: PackedKV, cfg: SemShareConfig | None = None) -> TokenMapping:
        """Exact alignment; tokens left over go through LSH on the E-cache (embedded lazily)."""
        cfg = cfg or self.config
        return map_tokens(ids, reference.token_ids, anchor=cfg.anchor_ngram, lsh_bits=cfg.lsh_bits,
                          lsh_tables=cfg.lsh_tables, fuzzy_min_cos=cfg.fuzzy_min_cos, seed=cfg.seed,
                          embed=self._embed, reference_lsh=lambda: self._reference_lsh(reference, cfg))

    def gather_reference(self, reference: PackedKV, mapping: TokenMapping,
                         reference_kv: torch.Tensor | None = None) -> torch.Tensor:
        """Reference KV in target order, keys re-rotated: ``[L, 2, H, n, D]`` (new memory).

        Gathers on the host copy (then moves only the n gathered rows; on an accelerator
        through a reusable pinned staging buffer, :mod:`semshare_core.staging`), or on
        ``reference_kv`` when it is given (already on the device).
        """
        idx = torch.from_numpy(mapping.ref_index)
        if reference_kv is not None:
            if tuple(reference_kv.shape) != tuple(reference.data.shape):
                raise ValueError(f"reference_kv shape {tuple(reference_kv.shape)} != packed {reference.data.shape}")
            idx = idx.to(reference_kv.device)
            kv = reference_kv.index_select(3, idx).to(device=self.device, dtype=self.dtype)
        elif self.device.type != "cpu":
            kv = self.staging.gather(reference.to_torch("cpu"), 3, idx).to(dtype=self.dtype)
        else:
            src = reference.to_torch("cpu")
            delta = torch.arange(idx.numel()) - idx
            if self.gather_kernel is not None and self.gather_kernel.handles(src, [src]):
                kv = torch.empty((*src.shape[:3], idx.numel(), src.shape[4]), dtype=src.dtype)
                cos, sin = self.rerotate.angles(delta, self.device)
                if self.gather_kernel.gather_rotate(kv, [src], np.zeros(idx.numel(), np.int32),
                                                    mapping.ref_index, cos, sin):
                    return kv
            kv = src.index_select(3, idx).to(dtype=self.dtype)
        delta = torch.arange(idx.numel(), device=self.device) - idx.to(self.device)
        self.rerotate.rotate_(kv[:, 0], delta)
        return kv

    def staging_mode(self, cfg: SemShareConfig, reference_kv: torch.Tensor | None = None) -> str:
        """How a hit fetches its reference rows (``PrefillStats.staging``), from ``cfg.host_staging``."""
        if reference_kv is not None:
            return "device"
        if cfg.host_staging == "layered" or (cfg.host_staging == "auto" and self.device.type == "cuda"):
            return "layered"
        return "cpu" if self.device.type == "cpu" else "whole"

    def reference_feed(self, reference: PackedKV, mapping: TokenMapping, cfg: SemShareConfig,
                       reference_kv: torch.Tensor | None = None):
        """What :func:`selective_prefill` reads the reference from: a :class:`LayerFeed`
        (``staging_mode`` "layered"; layers 0 and 1 already staged) or the result of
        :meth:`gather_reference` in an :class:`ImmediateFeed`."""
        mode = self.staging_mode(cfg, reference_kv)
        if mode != "layered":
            return ImmediateFeed(self.gather_reference(reference, mapping, reference_kv), mode)
        idx = torch.from_numpy(mapping.ref_index)
        delta = torch.arange(idx.numel(), device=self.device) - idx.to(self.device)
        feed = LayerFeed(reference.to_torch("cpu"), idx, self.layer_slots, self.device, self.dtype,
                         self.rerotate.angles(delta, self.device), self.rerotate.rotate_angles_)
        try:
            feed.stage(0)
            feed.stage(1)
        except BaseException:
            feed.finish()
            raise
        return feed

    def _clock(self) -> float:
        """``perf_counter`` after the device's queued work is done (stage timings on GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _prefill_hit(self, ids: np.ndarray, reference: PackedKV, cfg: SemShareConfig,
                     reference_kv: torch.Tensor | None) -> PrefillResult:
        n, L = int(ids.size), self.num_layers
        t0 = self._clock()
        mapping = self.map_to_reference(ids, reference, cfg)
        t1 = self._clock()
        if cfg.recompute_ratio < 1.0:
            forced = mapping.must_recompute.copy()
            forced[max(0, n - cfg.window):] = True
            if self.planned_rows(n, int(forced.sum()), cfg) >= n * L:
                # too little matched to save anything: the exact full prefill is as cheap
                logger.debug("hit planned to recompute as much as a full prefill (%d of %d tokens forced): "
                             "full prefill", int(forced.sum()), n)
                return self._full(ids, mapping_ms=(t1 - t0) * 1e3)
        feed = self.reference_feed(reference, mapping, cfg, reference_kv)
        t2 = self._clock()
        return self._selective(ids, feed, mapping.must_recompute, mapping, mapping.counts, cfg, (t1 - t0) * 1e3,
                               (t2 - t1) * 1e3)

    def _selective(self, ids: np.ndarray, feed, forced: np.ndarray, mapping, counts: dict, cfg: SemShareConfig,
                   mapping_ms: float, gather_ms: float) -> PrefillResult:
        """The selective prefill on a prepared reference ``feed`` (one or several sources),
        pruning when ``retention`` < 1, and the hit's :class:`PrefillResult`. ``forced``:
        bool ``[n]``, rows recomputed in every layer."""
        n, L = int(ids.size), self.num_layers
        t2 = self._clock()
        prune = cfg.retention < 1.0
        out = selective_prefill(self.model, torch.from_numpy(ids), feed, torch.from_numpy(forced), cfg,
                                record_attention=prune, compiled=self.compiled_selective)
        kept = None
        if prune:
            floor = min(n, cfg.sink_tokens + cfg.window)
            budgets = [max(b, floor) for b in layer_budgets(n, L, cfg.retention_share)]
            kept = [retained_indices(out.importance[l], budgets[l], cfg.recovery, cfg.sink_tokens, cfg.window)
                    for l in range(L)]
        cache = pruned_cache(out.keys, out.values, kept)
        t3 = self._clock()
        recomputed = out.rows_per_layer[1] if L > 1 else n
        stats = PrefillStats(prompt_tokens=n, hit=True, reused_tokens=n - recomputed, recomputed_tokens=recomputed,
                             rows_per_layer=out.rows_per_layer, probe_rows=out.probe_rows,
                             retained_per_layer=[int(k.numel()) for k in kept] if kept else [n] * L,
                             mapping=counts, mapping_ms=mapping_ms, gather_ms=gather_ms,
                             prefill_ms=(t3 - t2) * 1e3, staging=feed.staging)
        return PrefillResult(ids, out.logits, cache, out.keys, out.values, stats, mapping, explicit_positions=True,
                             kept=kept)

    # several sources (RAG-shaped prompts) -------------------------------------------
    def prefill_multi(self, ids: np.ndarray, sources: Sequence[PackedKV], config: SemShareConfig | None = None,
                      sources_kv: Sequence[torch.Tensor | None] | None = None) -> PrefillResult:
        """Prefill ``ids`` reusing the KV of several cached prompts at once.

        ``sources``: packed KVs, best first (e.g. :meth:`SemanticIndex.lookup_sources`'s
        order); ``sources_kv``: optionally, per source, its KV already on the engine's
        device ``[L, 2, H, m, D]`` (None where it is not). A source that fails the model
        signature, is malformed, or whose device tensor has the wrong shape is dropped
        (``stats.sources[i]["dropped"]``) and the hit goes on with the others; with none
        left it is a full prefill. Only the first ``max_sources`` good sources are read.
        With one good source this is exactly :meth:`prefill` with that reference.
        Each prompt token maps to (source, position) (:mod:`semshare_core.sources`), the
        rows are gathered per source into one buffer and every key re-rotated by its own
        offset; then the usual selective prefill runs, with the first ``boundary_rows``
        tokens after each boundary (a run from another source or another place) forced
        into the recomputed set.
        """
        cfg = config or self.config
        ids = _own_ids(ids)
        if ids.size == 0:
            raise ValueError("empty prompt")
        kvs = list(sources_kv) if sources_kv is not None else [None] * len(sources)
        if len(kvs) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(kvs)} device tensors")
        info, good = [], []
        for i, (src, kv) in enumerate(zip(sources, kvs)):
            rec = {"index": i, "tokens": 0, "rows": 0, "exact": 0, "used": False, "dropped": None}
            info.append(rec)
            try:
                if not isinstance(src, PackedKV):
                    raise KVFormatError(f"not a PackedKV: {type(src).__name__}")
                rec["tokens"] = src.seq_len
                self.signature.check(src.signature)
                src.validate()
                if src.seq_len == 0:
                    raise KVFormatError("empty source")
                if kv is not None and tuple(kv.shape) != tuple(src.data.shape):
                    raise KVFormatError(f"device KV shape {tuple(kv.shape)} != packed {src.data.shape}")
            except (KVMismatchError, KVFormatError) as e:
                rec["dropped"] = str(e)
                logger.warning("source %d dropped: %s", i, e)
                continue
            if len(good) >= cfg.max_sources:
                rec["dropped"] = f"over max_sources={cfg.max_sources}"
                continue
            good.append(i)
        with self.lock, torch.inference_mode():
            if not good or ids.size < cfg.min_reuse_tokens:
                pre = self._full(ids)
            elif len(good) == 1:
                i = good[0]
                pre = self.prefill(ids, sources[i], cfg, kvs[i])
                if pre.stats.hit:
                    info[i]["used"] = True
                    m = pre.mapping
                    info[i]["rows"] = int(ids.size) if m is None else int((~m.must_recompute).sum())
                    info[i]["exact"] = int(ids.size) if m is None else int(m.exact.sum())
            else:
                replay = next((i for i in good if cfg.replay_exact and sources[i].last_logits is not None
                               and np.array_equal(sources[i].token_ids, ids)), None)
                if replay is not None:
                    pre = self._replay(ids, sources[replay], kvs[replay])
                    info[replay].update(used=True, rows=int(ids.size), exact=int(ids.size))
                else:
                    pre = self._prefill_multi_hit(ids, [sources[i] for i in good], cfg, [kvs[i] for i in good])
                    if pre.stats.hit:
                        m = pre.mapping
                        rows = m.rows_per_source()
                        exact = np.bincount(m.source[m.exact].astype(np.int64), minlength=len(good)).tolist()
                        for k, i in enumerate(good):
                            info[i].update(used=rows[k] > 0, rows=int(rows[k]), exact=int(exact[k]))
            pre.stats.sources = info
            return pre

    def map_to_sources(self, ids: np.ndarray, sources: Sequence[PackedKV],
                       cfg: SemShareConfig | None = None) -> SourceMapping:
        """Several-source mapping (:func:`semshare_core.sources.map_sources`); each source's
        LSH tables come from the same per-reference cache as :meth:`map_to_reference`."""
        cfg = cfg or self.config
        return map_sources(ids, [s.token_ids for s in sources], anchor=cfg.anchor_ngram, near=cfg.source_near,
                           fuzzy_min_cos=cfg.fuzzy_min_cos, embed=self._embed,
                           source_lsh=lambda k: self._reference_lsh(sources[k], cfg))

    def gather_sources(self, sources: Sequence[PackedKV], mapping: SourceMapping,
                       sources_kv: Sequence[torch.Tensor | None] | None = None, from_layer: int = 0) -> torch.Tensor:
        """Rows of several sources in prompt order, each key re-rotated by its own offset
        (prompt position - source position): ``[L, 2, H, n, D]`` (new memory, on the device).

        One output buffer. A source already on the engine's device (its device tensor, or any
        source when the engine runs on the CPU) is copied in one slice per run
        (:meth:`SourceMapping.runs`: prompt rows contiguous in one source); a host source for
        an accelerator is gathered on the host with one ``index_select`` of just its rows and
        copied over once. Unmapped rows are zero (they are recomputed in every layer), and so
        are layers below ``from_layer`` (for a caller that recomputes those layers on every
        row and never reads their reused K/V).
        """
        n = int(mapping.source.size)
        first = sources[0].data.shape
        out = torch.empty((first[0], 2, first[2], n, first[4]), dtype=self.dtype, device=self.device)
        if from_layer > 0:
            out[:from_layer].zero_()
        kvs = list(sources_kv) if sources_kv is not None else [None] * len(sources)
        on_device = [kv is not None or self.device.type == "cpu" for kv in kvs]
        local = [(kv if kv is not None else src.to_torch("cpu"))[from_layer:] if ok else None
                 for src, kv, ok in zip(sources, kvs, on_device)]
        delta = (torch.arange(n) - torch.from_numpy(mapping.src_index)).to(self.device)
        if self.gather_kernel is not None and all(t is not None for t in local):
            whole = [(kv if kv is not None else src.to_torch("cpu")) for src, kv in zip(sources, kvs)]
            if self.gather_kernel.handles(out, whole):
                cos, sin = self.rerotate.angles(delta, self.device)
                if self.gather_kernel.gather_rotate(out, whole, mapping.source, mapping.src_index, cos, sin,
                                                    from_layer):
                    return out
        dst = out[from_layer:]
        starts, stops, owner, src_starts = mapping.runs()
        for a, b, k, p in zip(starts.tolist(), stops.tolist(), owner.tolist(), src_starts.tolist()):
            if local[k] is not None:
                dst[:, :, :, a:b].copy_(local[k][:, :, :, p:p + b - a])
        src_t = torch.from_numpy(mapping.source.astype(np.int64))
        pos_t = torch.from_numpy(mapping.src_index)
        for k, packed in enumerate(sources):
            if on_device[k]:
                continue
            rows = torch.nonzero(src_t == k).reshape(-1)
            if rows.numel() == 0:
                continue
            part = packed.to_torch("cpu")[from_layer:].index_select(3, pos_t[rows])
            dst.index_copy_(3, rows.to(self.device), part.to(device=self.device, dtype=self.dtype))
        none = torch.nonzero(src_t < 0).reshape(-1)
        if none.numel():
            dst.index_fill_(3, none.to(self.device), 0)
        self.rerotate.rotate_(dst[:, 0], delta)
        return out

    def source_forced(self, mapping: SourceMapping, cfg: SemShareConfig) -> np.ndarray:
        """bool ``[n]``: rows a several-source hit must recompute: unmatched tokens, plus the
        first ``boundary_rows`` tokens of each run that does not continue the previous one
        (:meth:`SourceMapping.boundaries`; the last ``window``
        tokens are added by the prefill itself)."""
        forced = mapping.must_recompute.copy()
        if cfg.boundary_rows > 0:
            n = forced.size
            for i in mapping.boundaries().tolist():
                forced[i:min(n, i + cfg.boundary_rows)] = True
        return forced

    def _prefill_multi_hit(self, ids: np.ndarray, sources: list[PackedKV], cfg: SemShareConfig,
                           sources_kv: list[torch.Tensor | None]) -> PrefillResult:
        n, L = int(ids.size), self.num_layers
        if cfg.source_recompute_floor > cfg.recompute_floor:  # several sources: a higher floor
            cfg = cfg.with_(recompute_floor=cfg.source_recompute_floor)
        t0 = self._clock()
        mapping = self.map_to_sources(ids, sources, cfg)
        forced = self.source_forced(mapping, cfg)
        t1 = self._clock()
        if cfg.recompute_ratio < 1.0:
            f = forced.copy()
            f[max(0, n - cfg.window):] = True
            if self.planned_rows(n, int(f.sum()), cfg) >= n * L:
                return self._full(ids, mapping_ms=(t1 - t0) * 1e3)
        # the probe reads layer 1's reused rows; layer 0 runs on every row and is never read
        skip = 1 if probe_runs(self.model, cfg) else 0
        buf = self.gather_sources(sources, mapping, sources_kv, from_layer=skip)
        staging = "device" if any(kv is not None for kv in sources_kv) else (
            "cpu" if self.device.type == "cpu" else "whole")
        feed = ImmediateFeed(buf, staging)
        t2 = self._clock()
        counts = dict(mapping.counts)
        counts["boundary"] = int((forced & ~mapping.must_recompute).sum())
        return self._selective(ids, feed, forced, mapping, counts, cfg, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    # decode ----------------------------------------------------------------------
    def decode(self, pre: PrefillResult, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop_on_eos: bool = True) -> Iterator[int]:
        """Stream generated token ids (batch 1). The prefill's cache is consumed.

        Decoding runs through :func:`semshare_core.batch.batch_step` with one request, the
        same step the scheduler runs for a whole batch: positions continue from the
        prompt length (also after a pruned hit), a sliding window is applied by position.
        Before the first decode step (after the first token is yielded) the prompt's
        full KV held for export is released (:meth:`PrefillResult.release_full_kv`) and
        the decode cache is copied into a :class:`~semshare_core.batch.SeqKV` (left in
        ``pre.cache``), so during decode only the retained rows stay in memory.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
        logits, state = pre.logits, None
        for i in range(max_new_tokens):
            tok = sample_token(logits.cpu(), temperature, top_p, gen)
            yield tok
            if (stop_on_eos and tok in self.eos_ids) or i + 1 == max_new_tokens:
                return
            if state is None:  # the cache is about to change: export_kv must have run by now
                state = self.decode_state(pre)
                pre.release_full_kv()
                pre.cache = state
            with self.lock, torch.inference_mode():
                logits = self.decode_step([state], [tok])[0]

    def generate(self, ids: np.ndarray, reference: PackedKV | None = None, **decode_kw) -> tuple[list[int], PrefillStats]:
        pre = self.prefill(ids, reference)
        return list(self.decode(pre, **decode_kw)), pre.stats

    # registration ----------------------------------------------------------------
    def export_kv(self, pre: PrefillResult) -> PackedKV:
        """The prompt's full KV (before pruning) and first-token logits, packed for the index.

        ``exact`` says whether they are a full prefill's (an identical prompt's replay of a
        hit's entry reproduces that hit's answer, and its derivation depth does not grow).
        Call before the second token is requested from :meth:`decode`: its first decode
        step changes the cache and releases these tensors.
        """
        if not pre.keys:
            raise RuntimeError("export_kv after decoding began: the prompt's full KV was already released")
        return PackedKV.from_layers(list(zip(pre.keys, pre.values)), pre.ids, self.signature, pre.logits,
                                    exact=pre.exact)

    def decode_state(self, pre: PrefillResult, extra_rows: int = 64):
        """The prefill's decode cache copied into a :class:`~semshare_core.batch.SeqKV` for
        batched decoding (:func:`semshare_core.batch.batch_step`); ``pre.cache`` is dropped,
        ``pre.keys``/``pre.values`` (the export source) stay untouched."""
        from .batch import SeqKV

        with torch.inference_mode():
            state = SeqKV.from_cache(pre.cache, int(pre.ids.size), pre.kept, extra_rows)
        pre.cache = None
        return state
