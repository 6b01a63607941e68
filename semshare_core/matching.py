"""Target -> reference token mapping.

1. **Exact** (token-id alignment, order-free): walk the target left to right; while the
   next reference token continues the current run, extend it; otherwise jump to the
   reference occurrence of the next ``anchor_ngram`` tokens whose run is longest
   (ties: nearest to where the previous run ended). Shifted, inserted, deleted and
   reordered spans therefore map 1:1. A token whose k-gram is not in the reference
   but whose id is (e.g. at a sentence boundary) maps to the nearest occurrence of the
   same id (kind ``EXACT_TOKEN``): its layer-0 K/V is still exact after re-rotation.
2. **Fuzzy**: remaining tokens are matched by random-projection LSH over
   position-aware input embeddings (embeddings rotated by a RoPE at their position,
   so candidates near the same relative place win), verified by cosine >=
   ``fuzzy_min_cos``.
3. Everything else is ``NONE``: its K/V must be recomputed in every layer.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

EXACT_SPAN = 0   # same id inside an aligned run of >= 2 tokens
EXACT_TOKEN = 1  # same id, lone match (different context)
FUZZY = 2        # LSH match on position-aware embeddings
NONE = 3         # no acceptable match: always recomputed
KIND_NAMES = ("exact_span", "exact_token", "fuzzy", "none")


class MatchKinds:
    """What every mapping derives from its ``kind`` array (int8 ``[n]``)."""

    kind: np.ndarray

    @property
    def counts(self) -> dict[str, int]:
        c = np.bincount(self.kind.astype(np.int64), minlength=4)
        return {name: int(c[i]) for i, name in enumerate(KIND_NAMES)}

    @property
    def must_recompute(self) -> np.ndarray:
        """bool ``[n]``: tokens whose reused K/V is meaningless."""
        return self.kind == NONE

    @property
    def exact(self) -> np.ndarray:
        return self.kind <= EXACT_TOKEN


@dataclass(frozen=True)
class TokenMapping(MatchKinds):
    """Mapping of a target prompt (length n) onto a reference prompt (length m).

    ``ref_index``: int64 ``[n]``, reference position each target token reuses (0 for
    ``NONE``: any valid row, it is overwritten). ``kind``: int8 ``[n]``, one of
    ``EXACT_SPAN``/``EXACT_TOKEN``/``FUZZY``/``NONE``.
    """

    ref_index: np.ndarray
    kind: np.ndarray
    ref_len: int


def align_exact(target: np.ndarray, reference: np.ndarray, anchor: int = 3,
                max_candidates: int = 32, max_extend: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Order-free exact alignment on token ids.

    Returns ``(ref_index int64 [n], kind int8 [n])`` with kinds EXACT_SPAN,
    EXACT_TOKEN or NONE. Every non-NONE target token satisfies
    ``target[i] == reference[ref_index[i]]``.
    """
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    r = np.asarray(reference, dtype=np.int64).reshape(-1)
    n, m = t.size, r.size
    ref_index = np.zeros(n, dtype=np.int64)
    kind = np.full(n, NONE, dtype=np.int8)
    if n == 0 or m == 0:
        return ref_index, kind
    rl, tl = r.tolist(), t.tolist()
    grams: dict[tuple, list[int]] = defaultdict(list)
    k = max(1, min(anchor, m))
    for j in range(m - k + 1):
        grams[tuple(rl[j:j + k])].append(j)
    by_id: dict[int, list[int]] = defaultdict(list)
    for j, tok in enumerate(rl):
        by_id[tok].append(j)

    def run_length(i: int, j: int) -> int:
        ln = 0
        while i + ln < n and j + ln < m and ln < max_extend and tl[i + ln] == rl[j + ln]:
            ln += 1
        return ln

    i, nxt = 0, -1  # nxt: reference position that would continue the current run
    while i < n:
        if 0 <= nxt < m and rl[nxt] == tl[i]:
            ref_index[i], kind[i] = nxt, EXACT_SPAN
            i, nxt = i + 1, nxt + 1
            continue
        cands = grams.get(tuple(tl[i:i + k])) if i + k <= n else None
        if cands:
            expect = nxt if nxt >= 0 else i
            if len(cands) > max_candidates:  # keep the ones nearest the expected place
                cands = sorted(cands, key=lambda j: abs(j - expect))[:max_candidates]
            best = max(cands, key=lambda j: (run_length(i, j), -abs(j - expect)))
            ref_index[i], kind[i] = best, EXACT_SPAN
            i, nxt = i + 1, best + 1
            continue
        occ = by_id.get(tl[i])
        if occ:
            expect = nxt if nxt >= 0 else i
            j = min(occ, key=lambda j: abs(j - expect))
            ref_index[i], kind[i] = j, EXACT_TOKEN
            i, nxt = i + 1, j + 1
            continue
        i, nxt = i + 1, (nxt + 1 if nxt >= 0 else -1)
    # a span of one token is a lone match
    span = kind == EXACT_SPAN
    prev_ok = np.zeros(n, dtype=bool)
    next_ok = np.zeros(n, dtype=bool)
    prev_ok[1:] = span[:-1] & (ref_index[1:] == ref_index[:-1] + 1)
    next_ok[:-1] = span[1:] & (ref_index[1:] == ref_index[:-1] + 1)
    kind[span & ~prev_ok & ~next_ok] = EXACT_TOKEN
    return ref_index, kind


def positional_embeddings(emb: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate embeddings ``[n, d]`` by a RoPE at ``positions`` ``[n]`` (pairs of dims).

    The dot product of two rotated vectors depends on their relative position, so LSH
    buckets prefer the same kind of token near the same place.
    """
    n, d = emb.shape
    half = d // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float32) / max(half, 1))
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = emb[:, :half], emb[:, half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=1)
    if d % 2:
        out = torch.cat([out, emb[:, -1:]], dim=1)
    return out


def lsh_match(query: torch.Tensor, keys: torch.Tensor, bits: int, tables: int, min_cos: float,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random-hyperplane LSH: for each query row ``[q, d]`` the best key row ``[k, d]``.

    Returns ``(index int64 [q], ok bool [q])``; ``ok`` is False where no candidate in
    any table reached ``min_cos`` cosine.
    """
    q, d = query.shape
    idx = np.zeros(q, dtype=np.int64)
    ok = np.zeros(q, dtype=bool)
    if q == 0 or keys.shape[0] == 0:
        return idx, ok
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(tables, d, bits, generator=g)
    weights = 2 ** torch.arange(bits, dtype=torch.int64)
    qn = torch.nn.functional.normalize(query.float(), dim=1)
    kn = torch.nn.functional.normalize(keys.float(), dim=1)
    qcodes = (((torch.einsum("nd,tdb->tnb", qn, planes) > 0).long()) * weights).sum(-1)  # [T, q]
    kcodes = (((torch.einsum("nd,tdb->tnb", kn, planes) > 0).long()) * weights).sum(-1)  # [T, k]
    cand: list[set[int]] = [set() for _ in range(q)]
    for t in range(tables):
        buckets: dict[int, list[int]] = defaultdict(list)
        for j, c in enumerate(kcodes[t].tolist()):
            buckets[c].append(j)
        for i, c in enumerate(qcodes[t].tolist()):
            cand[i].update(buckets.get(c, ()))
    for i in range(q):
        if not cand[i]:
            continue
        cj = torch.tensor(sorted(cand[i]), dtype=torch.int64)
        sims = kn[cj] @ qn[i]
        b = int(torch.argmax(sims))
        if float(sims[b]) >= min_cos:
            idx[i], ok[i] = int(cj[b]), True
    return idx, ok


class ReferenceLSH:
    """The reference side of the fuzzy match, built once per reference prompt.

    Holds the LSH codes of the reference's position-aware embeddings (``tables`` x
    ``bits`` random hyperplanes), bucketed per table. Embeddings are not kept: a query's
    candidates are verified by embedding just those rows again (``embed``: int64 ids
    ``[k]`` -> float32 ``[k, d]``, on the CPU). Matches :func:`lsh_match` exactly.
    """

    def __init__(self, ref_ids: np.ndarray, embed, bits: int, tables: int, seed: int = 0):
        # a copy: engines cache these tables across requests, and ``ref_ids`` may be a
        # zero-copy view into shared memory (a reference fetched from Ray's object store)
        # that must not stay pinned for as long as the cache holds the tables
        self.ids = np.array(ref_ids, dtype=np.int64).reshape(-1)
        self.embed = embed
        m = self.ids.size
        keys = positional_embeddings(embed(self.ids), torch.arange(m))
        g = torch.Generator().manual_seed(seed)
        self.planes = torch.randn(tables, keys.shape[1], bits, generator=g)
        self.weights = 2 ** torch.arange(bits, dtype=torch.int64)
        kcodes = self._codes(torch.nn.functional.normalize(keys.float(), dim=1)).numpy()  # [T, m]
        self.buckets: list[dict[int, np.ndarray]] = []
        for t in range(tables):
            order = np.argsort(kcodes[t], kind="stable")
            codes, starts = np.unique(kcodes[t][order], return_index=True)
            self.buckets.append(dict(zip(codes.tolist(), np.split(order, starts[1:]))))

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        return (((torch.einsum("nd,tdb->tnb", x, self.planes) > 0).long()) * self.weights).sum(-1)

    def match(self, query: torch.Tensor, min_cos: float) -> tuple[np.ndarray, np.ndarray]:
        """For each row of ``query`` ``[q, d]`` (position-aware embeddings) the best reference row."""
        return self.match_near(query, min_cos)

    def match_near(self, query: torch.Tensor, min_cos: float, centers: np.ndarray | None = None,
                   radius: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`match`, with candidates of row ``i`` limited to reference positions within
        ``radius`` of ``centers[i]`` when both are given (several-source mapping)."""
        q = query.shape[0]
        idx, ok = np.zeros(q, dtype=np.int64), np.zeros(q, dtype=bool)
        if q == 0 or self.ids.size == 0:
            return idx, ok
        qn = torch.nn.functional.normalize(query.float(), dim=1)
        qcodes = self._codes(qn).tolist()
        empty = np.zeros(0, dtype=np.int64)
        cands = [np.unique(np.concatenate([b.get(c[i], empty) for b, c in zip(self.buckets, qcodes)]))
                 for i in range(q)]
        if centers is not None and radius is not None:
            cands = [c[np.abs(c - int(centers[i])) <= radius] for i, c in enumerate(cands)]
        rows = np.unique(np.concatenate(cands)) if cands else empty
        if rows.size == 0:
            return idx, ok
        kn = torch.nn.functional.normalize(
            positional_embeddings(self.embed(self.ids[rows]), torch.from_numpy(rows)).float(), dim=1)
        where = {int(j): k for k, j in enumerate(rows.tolist())}
        for i, cj in enumerate(cands):
            if cj.size == 0:
                continue
            sims = kn[[where[int(j)] for j in cj]] @ qn[i]
            b = int(torch.argmax(sims))
            if float(sims[b]) >= min_cos:
                idx[i], ok[i] = int(cj[b]), True
        return idx, ok


def map_tokens(target_ids: np.ndarray, ref_ids: np.ndarray, target_emb: torch.Tensor | None = None,
               ref_emb: torch.Tensor | None = None, *, anchor: int = 3, lsh_bits: int = 10,
               lsh_tables: int = 4, fuzzy_min_cos: float = 0.5, seed: int = 0, embed=None,
               reference_lsh=None) -> TokenMapping:
    """Map every target token to a reference token (exact first, then LSH fuzzy).

    ``target_emb`` ``[n, d]`` / ``ref_emb`` ``[m, d]``: input embeddings (E-cache).
    Alternatively ``embed`` (ids -> ``[k, d]``) embeds only the tokens left unmatched
    after the exact pass, and ``reference_lsh`` (a callable returning the reference's
    :class:`ReferenceLSH`, e.g. from a cache) is asked for only when some are left.
    Without either, only exact matching runs.
    """
    t = np.asarray(target_ids, dtype=np.int64).reshape(-1)
    r = np.asarray(ref_ids, dtype=np.int64).reshape(-1)
    ref_index, kind = align_exact(t, r, anchor=anchor)
    todo = np.nonzero(kind == NONE)[0]
    if todo.size and embed is not None and r.size:
        lsh = reference_lsh() if reference_lsh is not None else ReferenceLSH(r, embed, lsh_bits, lsh_tables, seed)
        j, ok = lsh.match(positional_embeddings(embed(t[todo]), torch.from_numpy(todo)), fuzzy_min_cos)
        ref_index[todo[ok]] = j[ok]
        kind[todo[ok]] = FUZZY
    elif todo.size and target_emb is not None and ref_emb is not None and r.size:
        tq = positional_embeddings(target_emb[torch.from_numpy(todo)], torch.from_numpy(todo))
        rk = positional_embeddings(ref_emb, torch.arange(r.size))
        j, ok = lsh_match(tq, rk, lsh_bits, lsh_tables, fuzzy_min_cos, seed=seed)
        ref_index[todo[ok]] = j[ok]
        kind[todo[ok]] = FUZZY
    return TokenMapping(ref_index=ref_index, kind=kind, ref_len=int(r.size))
