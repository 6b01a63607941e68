"""Mapping a prompt onto several cached prompts (sources) at once: RAG-shaped prompts.

A prompt built from passages that were cached in *different* prompts (A cached with B, C;
D with E, F; new prompt A + D + G) is covered by no single entry, but by a few of them.
Every target token maps to ``(source, position in that source)``:

1. **Exact runs from any source** (token ids, order-free, like
   :func:`semshare_core.matching.align_exact`): walk the target left to right; while the
   next position of the current source continues the run, extend it; otherwise look up
   the next ``anchor`` tokens in every source and jump to the occurrence whose run is
   longest (ties: the current source near where the previous run ended, then the
   better-ranked source). A run never crosses the end of its source.
2. **Lone ids** (kind ``EXACT_TOKEN``): a token whose k-gram is in no source but whose id
   is, maps to an occurrence of that id only **inside the source of the run it
   continues** and at most ``near`` positions from where that run would continue.
   With one reference, :func:`~semshare_core.matching.align_exact` takes the nearest
   occurrence anywhere; with several, that lands ~165 tokens per 540-token prompt in the
   *wrong passage* (measured), whose deep-layer K/V carry another context.
3. **Fuzzy** (LSH on position-aware input embeddings, cosine >= ``fuzzy_min_cos``):
   only against the source of the nearest mapped neighbour (the previous one, else the
   next one), and at most ``near`` positions from the position that neighbour implies.
4. Everything else is ``NONE`` (recomputed in every layer). ``near = 0`` turns 2 and 3 off.

With one source the engine does not use this module: the single-reference mapping
(:func:`~semshare_core.matching.map_tokens`) stays exactly what it was.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .matching import EXACT_SPAN, EXACT_TOKEN, FUZZY, NONE, MatchKinds, ReferenceLSH, positional_embeddings


@dataclass(frozen=True)
class SourceMapping(MatchKinds):
    """Mapping of a target prompt (length n) onto several sources.

    ``source``: int32 ``[n]``, index into the list of sources (-1 for ``NONE``);
    ``src_index``: int64 ``[n]``, position in that source (0 for ``NONE``);
    ``kind``: int8 ``[n]`` (``EXACT_SPAN``/``EXACT_TOKEN``/``FUZZY``/``NONE``);
    ``src_lens``: length of every source.
    """

    source: np.ndarray
    src_index: np.ndarray
    kind: np.ndarray
    src_lens: tuple[int, ...]

    def rows_per_source(self) -> list[int]:
        """Target tokens mapped to each source (any kind but ``NONE``)."""
        ok = self.source >= 0
        return np.bincount(self.source[ok].astype(np.int64), minlength=len(self.src_lens)).tolist()

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Maximal stretches of mapped tokens that are contiguous both in the prompt and in one
        source: int64 arrays ``(start, stop, source, src_start)`` (prompt rows ``[start, stop)``
        come from rows ``[src_start, src_start + stop - start)`` of ``source``). Unmapped tokens
        belong to no run."""
        mapped = np.nonzero(self.source >= 0)[0]
        if mapped.size == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z, z
        s, p = self.source[mapped].astype(np.int64), self.src_index[mapped]
        new = np.ones(mapped.size, dtype=bool)
        new[1:] = (s[1:] != s[:-1]) | (p[1:] != p[:-1] + 1) | (mapped[1:] != mapped[:-1] + 1)
        first = np.nonzero(new)[0]
        last = np.append(first[1:], mapped.size) - 1
        return (mapped[first].astype(np.int64), mapped[last].astype(np.int64) + 1, s[first], p[first].astype(np.int64))

    def boundaries(self) -> np.ndarray:
        """int64 positions ``i > 0`` where a mapped token does not continue the previous
        mapped token's run: another source, or another place in the same source (e.g. two
        passages of one cached prompt that were not adjacent there), or the same run
        resumed after unmapped tokens (an edit: a changed number's digits). The reused K/V
        from such a token on never saw the tokens before it."""
        mapped = np.nonzero(self.source >= 0)[0]
        if mapped.size < 2:
            return np.zeros(0, dtype=np.int64)
        s, p = self.source[mapped], self.src_index[mapped]
        gap = mapped[1:] - mapped[:-1]
        jump = (s[1:] != s[:-1]) | (p[1:] - p[:-1] != gap) | (gap > 1)
        return mapped[1:][jump].astype(np.int64)


def align_sources(target: np.ndarray, sources: Sequence[np.ndarray], anchor: int = 3, near: int = 16,
                  max_candidates: int = 32, max_extend: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact alignment of ``target`` onto several sources. Returns ``(source int32, src_index
    int64, kind int8)``, each ``[n]``; kinds ``EXACT_SPAN``, ``EXACT_TOKEN`` (lone id, same
    source, within ``near`` of the run it continues) or ``NONE``. Every mapped token
    satisfies ``target[i] == sources[source[i]][src_index[i]]``.
    """
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    n = t.size
    src = np.full(n, -1, dtype=np.int32)
    pos = np.zeros(n, dtype=np.int64)
    kind = np.full(n, NONE, dtype=np.int8)
    refs = [np.asarray(r, dtype=np.int64).reshape(-1) for r in sources]
    if n == 0 or not refs or all(r.size == 0 for r in refs):
        return src, pos, kind
    # one virtual reference: the sources concatenated; grams never cross a source's end
    offsets = np.cumsum([0] + [r.size for r in refs])
    owner = np.concatenate([np.full(r.size, s, dtype=np.int64) for s, r in enumerate(refs)])
    ends = offsets[1:][owner]  # exclusive end of each global position's source
    rl = np.concatenate(refs).tolist()
    ends_l, owner_l = ends.tolist(), owner.tolist()
    tl = t.tolist()
    m = len(rl)
    k = max(1, anchor)
    grams: dict[tuple, list[int]] = defaultdict(list)
    by_id: dict[tuple, list[int]] = defaultdict(list)  # (source, id) -> global positions
    for s, r in enumerate(refs):
        off, rr = int(offsets[s]), r.tolist()
        kk = max(1, min(k, len(rr)))
        for j in range(len(rr) - kk + 1):
            grams[tuple(rr[j:j + kk])].append(off + j)
        for j, tok in enumerate(rr):
            by_id[(s, tok)].append(off + j)

    def run_length(i: int, j: int) -> int:
        ln, end = 0, ends_l[j]
        while i + ln < n and j + ln < end and ln < max_extend and tl[i + ln] == rl[j + ln]:
            ln += 1
        return ln

    gpos = np.zeros(n, dtype=np.int64)
    i, nxt, cur = 0, -1, -1  # nxt: global position continuing the current run; cur: its source
    while i < n:
        if 0 <= nxt < m and cur >= 0 and nxt < offsets[cur + 1] and rl[nxt] == tl[i]:
            gpos[i], kind[i] = nxt, EXACT_SPAN
            i, nxt = i + 1, nxt + 1
            continue
        cands = None
        for kk in {max(1, min(k, r.size)) for r in refs}:  # k, or shorter for sources under k tokens
            if i + kk <= n:
                c = grams.get(tuple(tl[i:i + kk]))
                if c:
                    cands = (cands or []) + c
        if cands:
            expect = nxt if nxt >= 0 else i

            def dist(j: int) -> int:
                return abs(j - expect) if owner_l[j] == cur else m + owner_l[j]

            if len(cands) > max_candidates:
                cands = sorted(cands, key=dist)[:max_candidates]
            best = max(cands, key=lambda j: (run_length(i, j), -dist(j)))
            gpos[i], kind[i] = best, EXACT_SPAN
            cur = owner_l[best]
            i, nxt = i + 1, best + 1
            continue
        if cur >= 0 and near > 0:
            occ = by_id.get((cur, tl[i]))
            if occ:
                j = min(occ, key=lambda j: abs(j - nxt))
                if abs(j - nxt) <= near:
                    gpos[i], kind[i] = j, EXACT_TOKEN
                    i, nxt = i + 1, j + 1
                    continue
        i, nxt = i + 1, (nxt + 1 if nxt >= 0 else -1)
    mapped = kind != NONE
    src[mapped] = owner[gpos[mapped]]
    pos[mapped] = gpos[mapped] - offsets[src[mapped]]
    # a span of one token is a lone match
    span = kind == EXACT_SPAN
    cont = (gpos[1:] == gpos[:-1] + 1)
    prev_ok = np.zeros(n, dtype=bool)
    next_ok = np.zeros(n, dtype=bool)
    prev_ok[1:] = span[:-1] & cont
    next_ok[:-1] = span[1:] & cont
    kind[span & ~prev_ok & ~next_ok] = EXACT_TOKEN
    return src, pos, kind


def _neighbour_anchor(src: np.ndarray, pos: np.ndarray, todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unmatched target position: the source of its nearest mapped neighbour (the
    previous one, else the next one) and the position in that source it implies
    (neighbour's position + the target distance). ``(-1, 0)`` when nothing is mapped."""
    n = src.size
    mapped = np.nonzero(src >= 0)[0]
    s_out = np.full(todo.size, -1, dtype=np.int64)
    p_out = np.zeros(todo.size, dtype=np.int64)
    if mapped.size == 0:
        return s_out, p_out
    k = np.searchsorted(mapped, todo)  # mapped[k-1] < todo <= mapped[k]
    has_prev = k > 0
    prev = mapped[np.maximum(k - 1, 0)]
    nxt = mapped[np.minimum(k, mapped.size - 1)]
    use = np.where(has_prev, prev, nxt)
    s_out[:] = src[use]
    p_out[:] = pos[use] + (todo - use)
    return s_out, p_out


def map_sources(target_ids: np.ndarray, source_ids: Sequence[np.ndarray], *, anchor: int = 3, near: int = 16,
                fuzzy_min_cos: float = 0.5, embed: Callable[[np.ndarray], torch.Tensor] | None = None,
                source_lsh: Callable[[int], ReferenceLSH] | None = None) -> SourceMapping:
    """Map every target token onto ``(source, position)``: exact runs from any source, then
    lone ids and fuzzy matches only in the neighbour's source, within ``near`` positions.

    ``embed`` (ids -> ``[k, d]`` float32, CPU) and ``source_lsh`` (source index -> its
    :class:`ReferenceLSH`) enable the fuzzy pass; without them only exact matching runs.
    """
    t = np.asarray(target_ids, dtype=np.int64).reshape(-1)
    refs = [np.asarray(r, dtype=np.int64).reshape(-1) for r in source_ids]
    src, pos, kind = align_sources(t, refs, anchor=anchor, near=near)
    todo = np.nonzero(kind == NONE)[0]
    if todo.size and near > 0 and embed is not None and source_lsh is not None:
        s_of, expect = _neighbour_anchor(src, pos, todo)
        # rotated at the position the neighbour implies *in the source* (the passage may have
        # moved far from where it sits in the target): candidates near there score best
        expect = np.maximum(expect, 0)
        emb = embed(t[todo]) if (s_of >= 0).any() else None
        for s in np.unique(s_of[s_of >= 0]).tolist():
            sel = s_of == s
            rows = todo[sel]
            q = positional_embeddings(emb[torch.from_numpy(np.nonzero(sel)[0])], torch.from_numpy(expect[sel]))
            j, ok = source_lsh(s).match_near(q, fuzzy_min_cos, expect[sel], near)
            src[rows[ok]] = s
            pos[rows[ok]] = j[ok]
            kind[rows[ok]] = FUZZY
    return SourceMapping(source=src, src_index=pos, kind=kind, src_lens=tuple(int(r.size) for r in refs))
