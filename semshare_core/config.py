"""`SemShareConfig`: every knob of the method, validated once at construction."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

SELECTIONS = ("deviation", "attention", "blend", "random", "positional")


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
        ``recompute_ratio``: share of the prompt's tokens recomputed in layers >= 1,
        the highest-deviation ones after layer 0 (paper: ~40%; default 0.4).
        ``recompute_decay``: multiplies that share per later layer (1.0 = constant);
        the share never drops below ``recompute_floor``. Unmatched tokens and the
        last ``window`` tokens are always recomputed on top. ``deviation_tol``: a
        token whose next-layer K/V deviates from the reused K/V by less than this
        (relative L2) is not recomputed at all (unchanged context, e.g. a shared
        prefix: measured 0 in bf16 on SmolLM2, vs 0.005-0.01 after an edit); not
        applied at ``recompute_ratio`` 1.0, which recomputes everything.
        ``attention_chunks``: layers >= 1 run the selected rows in this many
        position-ordered chunks, each attending only to the keys it can see (same
        result, less masked-out attention work; 1 = one call).
    Pruning (decode memory)
        ``retention``: share of prompt tokens kept at the deepest layer; per-layer
        budget decays exponentially from 1.0 at layer 0 (``retention ** (l / (L-1))``).
        1.0 disables pruning. Within the budget the most attended tokens (attention of
        the last ``window`` queries) are kept, plus the first ``sink_tokens`` and the
        last ``window`` tokens; ``recovery`` < 1 stops earlier, once that share of the
        attention mass is covered (0.95 kept only ~15-30% of tokens at the deepest
        layer on SmolLM2 whatever the budget, and cost quality, so the default 1.0
        lets the budget decide).
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
    recompute_ratio: float = 0.4
    recompute_decay: float = 1.0
    recompute_floor: float = 0.0
    deviation_tol: float = 1e-3
    attention_chunks: int = 8
    selection: str = "deviation"
    window: int = 8
    retention: float = 1.0
    recovery: float = 1.0
    sink_tokens: int = 4
    seed: int = 0

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
        check(1 <= self.attention_chunks <= 64, "attention_chunks must be in [1, 64]")
        check(0.0 <= self.deviation_tol < 1.0, f"deviation_tol must be in [0, 1), got {self.deviation_tol}")
        check(self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check(0.0 < self.recompute_decay <= 1.0, "recompute_decay must be in (0, 1]")
        check(0.0 < self.retention <= 1.0, f"retention must be in (0, 1], got {self.retention}")
        check(self.window >= 1, "window must be >= 1")
        check(self.sink_tokens >= 0, "sink_tokens must be >= 0")

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

    def recompute_share(self, layer: int) -> float:
        """Share of prompt tokens recomputed at decoder layer ``layer`` (>= 1)."""
        return max(self.recompute_floor, self.recompute_ratio * self.recompute_decay ** max(0, layer - 1))

    def retention_share(self, layer: int, num_layers: int) -> float:
        """Budget (share of prompt tokens) the pruned cache keeps at ``layer``."""
        if self.retention >= 1.0 or num_layers <= 1:
            return 1.0
        return self.retention ** (layer / (num_layers - 1))
