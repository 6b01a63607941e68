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
from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from .config import SemShareConfig
from .families import family_of
from .fingerprint import prompt_vector, token_embeddings
from .kv import ModelSignature, PackedKV
from .matching import ReferenceLSH, TokenMapping, map_tokens
from .prompts import encode_chat, encode_text
from .staging import HostStaging, ImmediateFeed, LayerFeed, PinnedSlots
from .prefill import full_length_cache, full_prefill, layer_step, model_step, selective_prefill
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
    mapping: TokenMapping | None = None
    explicit_positions: bool = False
    exact: bool = False  # keys/values/logits are exactly a full prefill's (export keeps the logits)

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


class SemShareEngine:
    """One model + tokenizer + config. Thread-safe: calls are serialised by a lock."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: SemShareConfig | None = None):
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
                config: SemShareConfig | None = None, reference_kv: torch.Tensor | None = None) -> PrefillResult:
        """Prefill ``ids`` ``[n]``; with ``reference`` reuse its KV (selective recompute).

        ``reference_kv``: optionally ``reference``'s KV already on the engine's device,
        ``[L, 2, H, m, D]`` (e.g. a hot entry kept on the GPU): the gather then runs there
        instead of on the host copy.
        """
        cfg = config or self.config
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("empty prompt")
        with self.lock, torch.inference_mode():
            if reference is not None and ids.size >= cfg.min_reuse_tokens and reference.seq_len > 0:
                self.signature.check(reference.signature)
                if (cfg.replay_exact and reference.last_logits is not None
                        and np.array_equal(reference.token_ids, ids)):
                    return self._replay(ids, reference, reference_kv)
                return self._prefill_hit(ids, reference, cfg, reference_kv)
            return self._full(ids)

    def _full(self, ids: np.ndarray, mapping_ms: float = 0.0) -> PrefillResult:
        """A plain full prefill (``model.forward``, exactly what ``generate`` does)."""
        t0 = time.perf_counter()
        logits, cache = full_prefill(self.model, torch.from_numpy(ids))
        ms = (time.perf_counter() - t0) * 1e3
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
        """Identical prompt, exact reference: its KV and first-token logits, no prefill.

        Decoding then runs through ``model.forward`` on a cache holding exactly what a
        full prefill computes, so the output equals a full prefill's.
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
        return PrefillResult(ids, logits, cache, keys, values, stats, exact=True)

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
            kv = reference.to_torch("cpu").index_select(3, idx).to(dtype=self.dtype)
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
        prune = cfg.retention < 1.0
        out = selective_prefill(self.model, torch.from_numpy(ids), feed,
                                torch.from_numpy(mapping.must_recompute), cfg, record_attention=prune)
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
                             mapping=mapping.counts, mapping_ms=(t1 - t0) * 1e3, gather_ms=(t2 - t1) * 1e3,
                             prefill_ms=(t3 - t2) * 1e3, staging=feed.staging)
        return PrefillResult(ids, out.logits, cache, out.keys, out.values, stats, mapping, explicit_positions=True)

    # decode ----------------------------------------------------------------------
    def decode(self, pre: PrefillResult, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop_on_eos: bool = True) -> Iterator[int]:
        """Stream generated token ids. The prefill's cache is consumed (mutated).

        Before the first decode step (after the first token is yielded) the prompt's full
        KV held for export is released (:meth:`PrefillResult.release_full_kv`), so that
        during decode only the decode cache stays in memory (retained rows only, when
        pruned).
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
        logits, pos = pre.logits, int(pre.ids.size)
        for i in range(max_new_tokens):
            tok = sample_token(logits.cpu(), temperature, top_p, gen)
            yield tok
            if (stop_on_eos and tok in self.eos_ids) or i + 1 == max_new_tokens:
                return
            if i == 0:  # the cache is about to change: export_kv must have run by now
                pre.release_full_kv()
            with self.lock, torch.inference_mode():
                if pre.explicit_positions:
                    logits = layer_step(self.model, tok, pos, pre.cache)
                else:
                    logits = model_step(self.model, tok, pre.cache)
            pos += 1

    def generate(self, ids: np.ndarray, reference: PackedKV | None = None, **decode_kw) -> tuple[list[int], PrefillStats]:
        pre = self.prefill(ids, reference)
        return list(self.decode(pre, **decode_kw)), pre.stats

    # registration ----------------------------------------------------------------
    def export_kv(self, pre: PrefillResult) -> PackedKV:
        """The prompt's full KV (before pruning), packed for the index.

        Exact results (full prefill, replay) also carry their first-token logits.
        Call before the second token is requested from :meth:`decode`: its first decode
        step changes the cache and releases these tensors.
        """
        if not pre.keys:
            raise RuntimeError("export_kv after decoding began: the prompt's full KV was already released")
        return PackedKV.from_layers(list(zip(pre.keys, pre.values)), pre.ids, self.signature,
                                    pre.logits if pre.exact else None)
