"""`SemShareConfig`: every knob of the method, validated once at construction."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SELECTIONS = ("deviation", "attention", "blend", "random", "positional")
HOST_STAGINGS = ("auto", "layered", "whole")
# attention_chunks = 0 on a CPU: one chunk per this many selected rows, at most CPU_MAX_CHUNKS
# (best counts measured, SmolLM2 bf16, 1 thread, Xeon AMX: 100 rows 1, 200 rows 2,
# 450 rows 4, 900 rows 4-6; a fixed 8 was 10-25% slower below ~500 rows)
CPU_ROWS_PER_CHUNK = 110
CPU_MAX_CHUNKS = 6


@dataclass(frozen=True)
class SemShareConfig:
    """Thresholds and schedules of semantic KV reuse.

    Retrieval
        ``sim_threshold``: cosine between the prompt vectors of target and reference
        (signed-hashed, sqrt-tf bag of token ``ngram``-grams, L2-normalised; see
        :mod:`semshare_core.fingerprint`). Roughly the share of n-grams two prompts
        have in common. Measured on SmolLM2 with stdlib prose: 10-30%-edited variants
        score 0.50-0.99, unrelated documents <= 0.21; the default 0.3 sits between.
        ``min_reuse_tokens``: prompts shorter than this never reuse (overhead wins).
        ``replay_exact``: a prompt identical to a reference whose KV came from a full
        prefill is answered from the stored KV and first-token logits, no prefill at all,
        with exactly the output of a full prefill.
    Mapping
        ``anchor_ngram``: length of the exact k-gram anchors used to align spans;
        ``lsh_bits`` / ``lsh_tables``: random-projection LSH on RoPE-rotated input
        embeddings for tokens without an exact match; ``fuzzy_min_cos``: a fuzzy
        candidate below this cosine is rejected and the token is recomputed.
    Recompute
        ``recompute_ratio``: share of the prompt's tokens recomputed in layer 1, chosen
        by ``selection`` after layer 0 (paper: ~40%). ``recompute_decay``: multiplies
        that share per later layer (1.0 = constant); the share never drops below
        ``recompute_floor``. Default 0.3 x 0.9^(l-1), floor 0.05: the fastest schedule
        that held every quality threshold in the project's selection/schedule sweep
        (SmolLM2, 1k and 2k tokens, prose and fact edits; docs/benchmarks.md).
        ``recompute_min_tokens``: no layer recomputes fewer rows than this (capped at the
        prompt), so short prompts keep enough fresh rows (default 128: from ~2.6k tokens
        the 5% floor is larger and it never binds). ``forced_in_budget``: whether the
        forced rows count inside that budget (true) or come on top of it (false, the
        default): a heavier edit then recomputes more instead of crowding out the
        context-affected rows the deviation picks. Both were chosen on chains of 512- and
        1k-token variants and a 1k/2k sweep (docs/benchmarks.md): forced rows inside the
        budget gave a pooled agreement median of 0.94 (below the 0.95 mark), on top 0.97,
        at 5.05x instead of 5.43x at 1k; the 128 floor costs another ~15% at 1k (4.28x).
        Forced rows: unmatched tokens and the last ``window`` tokens, always recomputed.
        ``deviation_tol``: a
        token whose next-layer K/V deviates from the reused K/V by less than this
        (relative L2) is not recomputed at all (unchanged context, e.g. a shared
        prefix: measured 0 in bf16 on SmolLM2, vs 0.005-0.01 after an edit); not
        applied at ``recompute_ratio`` 1.0, which recomputes everything.
        ``attention_chunks``: layers >= 1 attend for the selected rows in this many
        position-ordered chunks, each over only the keys it can see (same result, less
        masked-out work; chunks of < 20 rows are merged). 0 = auto: on a CPU one chunk
        per ~110 selected rows, 1 to 6 (:data:`CPU_ROWS_PER_CHUNK`: a fixed 8 chunks split
        a 10% selection into chunks too small for the CPU flash kernel's query blocks;
        per-rows chunks were 10-25% faster at 10-40% of 1k-2k rows, SmolLM2 bf16, 1
        thread), 1 on an accelerator (on an H200 the extra launches cost more than they
        save).
        ``row_bucket``: layers >= 1 recompute a multiple of this many rows (or the whole
        prompt): the budget is rounded up, and rows past the forced and context-affected
        ones are filled with the best-scored unchanged rows (recomputing a row is always
        exact, so this only adds work). Row counts then come from a small fixed set, and
        a layer keeps the previous layer's rows until its budget drops a whole bucket,
        which is what an accelerator needs to capture the per-layer loop (CUDA graphs,
        ``torch.compile``) with few shapes. Default 1 (no rounding): on a CPU extra rows
        only cost time, and the capture itself is not built yet (benchmarks/gpu_run.sh
        measures 64 against 1 when a GPU is lent).
        ``selection``: which rows fill the budget after layer 0: ``deviation`` (layer-1
        K/V deviation), ``attention`` (attention of the prompt's last queries at layer 1),
        ``blend`` (their product), ``random`` / ``positional`` (controls). Forced rows
        (unmatched tokens, the last ``window``) count inside the budget.
    Pruning (decode memory)
        ``retention``: share of prompt tokens kept at the deepest layer; per-layer
        budget decays exponentially from 1.0 at layer 0 (``retention ** (l / (L-1))``).
        1.0 disables pruning. Within the budget the most attended tokens (attention of
        the last ``window`` queries) are kept, plus the first ``sink_tokens`` and the
        last ``window`` tokens; ``recovery`` < 1 stops earlier, once that share of the
        attention mass is covered (0.95 kept only ~15-30% of tokens at the deepest
        layer on SmolLM2 whatever the budget, and cost quality, so the default 1.0
        lets the budget decide).
    Several sources (RAG-shaped prompts, :mod:`semshare_core.sources`)
        ``max_sources``: most cached prompts one hit reuses (1 = one reference, as
        before). ``source_candidates``: top-k entries by cosine that
        :meth:`semshare_core.index.SemanticIndex.lookup_sources` considers, each at least
        ``source_min_sim``; a greedy cover then adds the candidate covering the most
        not-yet-covered prompt ``ngram``-grams while it adds at least ``source_min_gain``
        of them (share of the prompt's distinct n-grams). ``source_near``: lone-id and
        fuzzy matches stay in the source of the run they continue, at most this many
        positions from where it would continue (0, the default: such tokens are
        recomputed). Measured (benchmarks/rag.py, SmolLM2, 1k/2k prompts of 3-4 sources):
        with several sources only 1-3 tokens per prompt are left to these rules and
        quality did not move beyond noise; a changed number's digits would land on the
        stale number's digits in the same passage, so they are off by default.
        ``boundary_rows``: with several sources, the first this-many tokens of each run
        that does not continue the previous one (another source, another place in one,
        or the same run resumed after unmapped tokens, i.e. an edit) are recomputed on
        top of the budget (their reused K/V never saw the tokens before them; after an
        edit, 3 x 18 held-out 2k prompts: fact answers 5/6 correct instead of 4/6,
        agreement p10 0.92 instead of 0.91, medians unchanged, FLOP +0.003). Default 16:
        the layer-1 probe recomputes ~57% of the first 16 rows of each run vs ~24% of
        rows past 64 (their deep-layer K/V deviate 0.14-0.18 vs 0.08 from a full
        prefill's), and at 2k tokens forcing 16 more rows per boundary lowered the perplexity ratio on all 4 prompts tried (median 1.05 -> 1.01), more
        than spending the same rows on a higher recompute_ratio (0.4, 0.5).
        ``source_recompute_floor``: the ``recompute_floor`` of a several-source hit (the
        larger of the two applies; a hit on one reference keeps ``recompute_floor``).
        Default 0.1: on two sets of six ~2k-token prompts of 3-4 sources (benchmarks/rag.py)
        it lowered or kept the perplexity ratio on all 12 prompts (medians 1.029 -> 1.018
        and 1.032 -> 1.026) for a FLOP proxy of 0.28 instead of 0.26 (CPU-time speedup 2.25x
        -> 2.10x in the same rounds), the cheapest of the rows-for-quality trades tried
        (boundary_rows 24/32, recompute_ratio 0.4, recompute_decay 0.95: 1.019-1.027 at
        0.29-0.34); at ~1k tokens ``recompute_min_tokens`` binds first. docs/rag.md.
    Fetch
        ``host_staging``: how a hit moves reference rows that live in host memory to the
        device (:mod:`semshare_core.staging`). ``layered``: one layer at a time through
        two reusable pinned slots, the copies asynchronous on CUDA and the host gather of
        layer l+2 overlapped with the device computing layer l; ``whole``: all layers in
        one pinned buffer, one copy, before the layer loop (on a CPU: a plain gather);
        ``auto``: ``layered`` on a CUDA device, ``whole`` elsewhere. Same results either
        way; the overlap is not yet measured on a GPU.
    """

    sim_threshold: float = 0.3
    replay_exact: bool = True
    ngram: int = 3
    fingerprint_dim: int = 4096
    min_reuse_tokens: int = 16
    anchor_ngram: int = 3
    lsh_bits: int = 10
    lsh_tables: int = 4
    fuzzy_min_cos: float = 0.5
    recompute_ratio: float = 0.3
    recompute_decay: float = 0.9
    recompute_floor: float = 0.05
    recompute_min_tokens: int = 128
    forced_in_budget: bool = False
    deviation_tol: float = 1e-3
    attention_chunks: int = 0
    row_bucket: int = 1
    selection: str = "deviation"
    window: int = 8
    retention: float = 1.0
    recovery: float = 1.0
    sink_tokens: int = 4
    seed: int = 0
    host_staging: str = "auto"
    max_sources: int = 4
    source_candidates: int = 8
    source_min_sim: float = 0.1
    source_min_gain: float = 0.05
    source_near: int = 0
    boundary_rows: int = 16
    source_recompute_floor: float = 0.1

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"SemShareConfig: {msg}")

        check(-1.0 <= self.sim_threshold <= 1.0, f"sim_threshold must be in [-1, 1], got {self.sim_threshold}")
        check(1 <= self.ngram <= 8, f"ngram must be in [1, 8], got {self.ngram}")
        check(64 <= self.fingerprint_dim <= 1 << 20, f"fingerprint_dim must be in [64, 2^20], got {self.fingerprint_dim}")
        check(self.min_reuse_tokens >= 1, "min_reuse_tokens must be >= 1")
        check(1 <= self.anchor_ngram <= 16, "anchor_ngram must be in [1, 16]")
        check(1 <= self.lsh_bits <= 30, "lsh_bits must be in [1, 30]")
        check(1 <= self.lsh_tables <= 64, "lsh_tables must be in [1, 64]")
        check(-1.0 <= self.fuzzy_min_cos <= 1.0, "fuzzy_min_cos must be in [-1, 1]")
        for name in ("recompute_ratio", "recompute_floor", "recovery"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0 and not math.isnan(v), f"{name} must be in [0, 1], got {v}")
        check(self.recompute_min_tokens >= 0, f"recompute_min_tokens must be >= 0, got {self.recompute_min_tokens}")
        check(0 <= self.attention_chunks <= 64, "attention_chunks must be in [0, 64] (0 = auto)")
        check(1 <= self.row_bucket <= 4096, f"row_bucket must be in [1, 4096], got {self.row_bucket}")
        check(0.0 <= self.deviation_tol < 1.0, f"deviation_tol must be in [0, 1), got {self.deviation_tol}")
        check(self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check(0.0 < self.recompute_decay <= 1.0, "recompute_decay must be in (0, 1]")
        check(0.0 < self.retention <= 1.0, f"retention must be in (0, 1], got {self.retention}")
        check(self.window >= 1, "window must be >= 1")
        check(self.sink_tokens >= 0, "sink_tokens must be >= 0")
        check(1 <= self.max_sources <= 64, f"max_sources must be in [1, 64], got {self.max_sources}")
        check(1 <= self.source_candidates <= 1024, "source_candidates must be in [1, 1024]")
        check(-1.0 <= self.source_min_sim <= 1.0, "source_min_sim must be in [-1, 1]")
        check(0.0 <= self.source_min_gain <= 1.0, "source_min_gain must be in [0, 1]")
        check(self.source_near >= 0, "source_near must be >= 0")
        check(self.boundary_rows >= 0, "boundary_rows must be >= 0")
        v = self.source_recompute_floor
        check(0.0 <= v <= 1.0 and not math.isnan(v), f"source_recompute_floor must be in [0, 1], got {v}")
        check(self.host_staging in HOST_STAGINGS,
              f"host_staging must be one of {HOST_STAGINGS}, got {self.host_staging!r}")

    def with_(self, **changes) -> "SemShareConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SemShareConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"SemShareConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def chunks_for(self, device: "torch.device", rows: int) -> int:
        """Attention chunks for ``rows`` selected rows on ``device`` (resolves ``attention_chunks = 0``)."""
        if self.attention_chunks:
            return self.attention_chunks
        if device.type != "cpu":
            return 1
        return max(1, min(CPU_MAX_CHUNKS, round(rows / CPU_ROWS_PER_CHUNK)))

    def bucketed(self, k: int, n: int) -> int:
        """``k`` rows rounded up to a multiple of ``row_bucket``, at most ``n``."""
        b = self.row_bucket
        return min(n, -(-k // b) * b) if b > 1 else k

    def recompute_share(self, layer: int) -> float:
        """Share of prompt tokens recomputed at decoder layer ``layer`` (>= 1)."""
        return max(self.recompute_floor, self.recompute_ratio * self.recompute_decay ** max(0, layer - 1))

    def recompute_rows(self, layer: int, n: int) -> int:
        """Rows of an ``n``-token prompt recomputed at decoder layer ``layer`` (>= 1):
        ``ceil(recompute_share(layer) * n)``, at least ``recompute_min_tokens``, at most ``n``."""
        return min(n, max(math.ceil(self.recompute_share(layer) * n), self.recompute_min_tokens))

    def layer_budget(self, layer: int, n: int, forced: int) -> int:
        """Rows recomputed at decoder layer ``layer`` (>= 1) of an ``n``-token hit with
        ``forced`` must-recompute rows: :meth:`recompute_rows` plus the forced rows
        (``forced_in_budget`` false), or at least the forced rows (true); at most ``n``."""
        share = self.recompute_rows(layer, n)
        return min(n, max(share, forced) if self.forced_in_budget else share + forced)

    def retention_share(self, layer: int, num_layers: int) -> float:
        """Budget (share of prompt tokens) the pruned cache keeps at ``layer``."""
        if self.retention >= 1.0 or num_layers <= 1:
            return 1.0
        return self.retention ** (layer / (num_layers - 1))
