"""`SemanticIndex`: prompts' retrieval vectors in faiss, with their KV payloads.

Plain class (no Ray): the server's index actor wraps it. One faiss inner-product
index per *namespace* (a tenant, or a tenant's ``cache_salt`` namespace), so a lookup
can only ever see its own namespace's entries. Capacity is bounded by ``max_items``
AND ``max_bytes`` (globally, and optionally per tenant).

Quotas and fairness are per *owner*: the tenant a namespace belongs to
(:func:`quota_owner`; a salted namespace ``<tenant>.salt-<hash>`` belongs to
``<tenant>``). So a client that sends a new ``cache_salt`` with every request fills
only its own tenant's quota, and when the whole index is full the entry evicted is the
least recently used one of an owner at or over its fair share (``max / owners``, in
items or bytes): the inserting tenant's own entries first when it is the one over, never
an under-share tenant's while someone is over. Empty namespaces give back their faiss
index and counters.
The payload is opaque (a :class:`~semshare_core.kv.PackedKV`, or an object-store
reference in the server); ``nbytes`` is what counts against the byte cap.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import faiss
import numpy as np

from .namespaces import SALT_SEPARATOR, quota_owner  # noqa: F401 - re-exported


@dataclass
class IndexEntry:
    key: str
    tenant: str
    token_ids: np.ndarray
    nbytes: int
    payload: Any
    created: float = field(default_factory=time.time)
    hits: int = 0
    faiss_id: int = -1


@dataclass(frozen=True)
class Match:
    """A lookup result above the threshold: the entry and its cosine similarity."""

    entry: IndexEntry
    similarity: float


@dataclass(frozen=True)
class SourceCover:
    """A several-source lookup result (:meth:`SemanticIndex.lookup_sources`).

    ``matches``: the chosen entries, in the order they were picked (the first is what
    :meth:`SemanticIndex.lookup` returns whenever that clears the threshold);
    ``gains``: share of the prompt's distinct n-grams each one added; ``covered``: share
    covered by all of them; ``candidates``: entries considered; ``coverage_any``: share
    covered by the union of all candidates (an upper bound for the chosen set).
    """

    matches: list[Match]
    gains: list[float]
    covered: float
    candidates: int
    coverage_any: float

    @property
    def entries(self) -> list[IndexEntry]:
        return [m.entry for m in self.matches]


class SemanticIndex:
    """Top-1 semantic lookup (and a several-source cover) with LRU eviction by items and bytes."""

    def __init__(self, dim: int, max_items: int = 1024, max_bytes: int = 1 << 30,
                 tenant_max_items: int | None = None, tenant_max_bytes: int | None = None,
                 owner_of: Callable[[str], str] = quota_owner):
        if dim <= 0 or max_items <= 0 or max_bytes <= 0:
            raise ValueError("dim, max_items and max_bytes must be positive")
        self.dim, self.max_items, self.max_bytes = dim, max_items, max_bytes
        self.tenant_max_items, self.tenant_max_bytes = tenant_max_items, tenant_max_bytes
        self.owner_of = owner_of
        self._entries: OrderedDict[str, IndexEntry] = OrderedDict()  # LRU order: oldest first
        self._faiss: dict[str, faiss.IndexIDMap2] = {}  # per namespace; dropped when empty
        self._by_id: dict[int, str] = {}
        self._ids = itertools.count(1)
        self._bytes = 0
        # per namespace and per owner (tenant); keys are dropped when they reach zero
        self._tenant_bytes: dict[str, int] = defaultdict(int)
        self._tenant_items: dict[str, int] = defaultdict(int)
        self._owner_bytes: dict[str, int] = defaultdict(int)
        self._owner_items: dict[str, int] = defaultdict(int)
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "inserts": 0, "rejected": 0}
        self._grams: dict[str, dict[int, np.ndarray]] = {}  # key -> {n: sorted distinct n-gram hashes}

    # writes ----------------------------------------------------------------------
    def add(self, key: str, vector: np.ndarray, token_ids: np.ndarray, nbytes: int, payload: Any,
            tenant: str = "default") -> list[IndexEntry]:
        """Insert (or replace) ``key``; returns the entries evicted to make room."""
        vec = self._check_vector(vector)
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if nbytes > self.max_bytes or (self.tenant_max_bytes is not None and nbytes > self.tenant_max_bytes):
            self.counters["rejected"] += 1
            raise ValueError(f"entry of {nbytes} bytes exceeds the cache's byte cap")
        if key in self._entries:
            self.remove(key)
        evicted = self._make_room(tenant, nbytes)
        fid = next(self._ids)
        index = self._faiss.get(tenant)
        if index is None:
            index = self._faiss[tenant] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        index.add_with_ids(vec[None], np.array([fid], dtype=np.int64))
        entry = IndexEntry(key, tenant, np.asarray(token_ids, dtype=np.int64).reshape(-1), int(nbytes), payload,
                           faiss_id=fid)
        self._entries[key] = entry
        self._by_id[fid] = key
        self._bytes += entry.nbytes
        self._tenant_bytes[tenant] += entry.nbytes
        self._tenant_items[tenant] += 1
        owner = self.owner_of(tenant)
        self._owner_bytes[owner] += entry.nbytes
        self._owner_items[owner] += 1
        self.counters["inserts"] += 1
        return evicted

    def remove(self, key: str) -> IndexEntry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._grams.pop(key, None)
        ns, owner = entry.tenant, self.owner_of(entry.tenant)
        index = self._faiss[ns]
        index.remove_ids(np.array([entry.faiss_id], dtype=np.int64))
        del self._by_id[entry.faiss_id]
        self._bytes -= entry.nbytes
        self._tenant_bytes[ns] -= entry.nbytes
        self._tenant_items[ns] -= 1
        self._owner_bytes[owner] -= entry.nbytes
        self._owner_items[owner] -= 1
        if self._tenant_items[ns] == 0:  # an empty namespace (e.g. a one-off salt) keeps nothing
            del self._faiss[ns], self._tenant_items[ns], self._tenant_bytes[ns]
        if self._owner_items[owner] == 0:
            del self._owner_items[owner], self._owner_bytes[owner]
        return entry

    def clear(self, tenant: str | None = None) -> list[IndexEntry]:
        """Remove every entry (of ``tenant`` if given); returns them."""
        keys = [k for k, e in self._entries.items() if tenant is None or e.tenant == tenant]
        return [self.remove(k) for k in keys]

    def _make_room(self, tenant: str, nbytes: int) -> list[IndexEntry]:
        """Evict until an entry of ``nbytes`` for namespace ``tenant`` fits; returns the evicted.

        First the owner's own quota (``tenant_max_*``, over all its namespaces: its own
        least recently used entries go). Then the global caps: the least recently used
        entry among owners at or over their fair share (:meth:`_over_share`).
        """
        evicted = []
        owner = self.owner_of(tenant)

        def over_tenant() -> bool:
            return ((self.tenant_max_items is not None and self._owner_items[owner] + 1 > self.tenant_max_items)
                    or (self.tenant_max_bytes is not None
                        and self._owner_bytes[owner] + nbytes > self.tenant_max_bytes))

        while self._owner_items.get(owner) and over_tenant():
            oldest = next(k for k, e in self._entries.items() if self.owner_of(e.tenant) == owner)
            evicted.append(self.remove(oldest))
        while self._entries and (len(self._entries) + 1 > self.max_items or self._bytes + nbytes > self.max_bytes):
            evicted.append(self.remove(self._victim(owner, nbytes)))
        self.counters["evictions"] += len(evicted)
        return evicted

    def _over_share(self, owner: str, inserting: str, nbytes: int, owners: int) -> bool:
        """``owner`` holds at least its fair share (``1 / owners`` of the items or bytes cap),
        counting the entry ``inserting`` is about to add."""
        items = self._owner_items.get(owner, 0) + (owner == inserting)
        size = self._owner_bytes.get(owner, 0) + (nbytes if owner == inserting else 0)
        return items * owners > self.max_items or size * owners > self.max_bytes or (
            owner == inserting and items * owners >= self.max_items)

    def _victim(self, inserting: str, nbytes: int) -> str:
        """Key to evict when the index is full: the inserting owner's LRU entry when it is over
        its fair share, else the LRU entry of any owner over its share, else the global LRU."""
        owners = len(self._owner_items) + (inserting not in self._owner_items)
        over = {o for o in self._owner_items if self._over_share(o, inserting, nbytes, owners)}
        if inserting in over:
            over = {inserting}
        if over:
            for k, e in self._entries.items():
                if self.owner_of(e.tenant) in over:
                    return k
        return next(iter(self._entries))

    # reads -----------------------------------------------------------------------
    def search(self, vector: np.ndarray, tenant: str = "default", k: int = 4) -> list[tuple[IndexEntry, float]]:
        """Best ``k`` entries of ``tenant`` by cosine, no side effects."""
        index = self._faiss.get(tenant)
        if index is None or index.ntotal == 0:
            return []
        sims, ids = index.search(self._check_vector(vector)[None], min(k, index.ntotal))
        return [(self._entries[self._by_id[int(i)]], float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0]

    def lookup(self, vector: np.ndarray, tenant: str = "default", threshold: float = 0.3) -> Match | None:
        """Best entry of ``tenant`` if its similarity >= ``threshold`` (marks it used)."""
        found = self.search(vector, tenant, k=1)
        if not found or found[0][1] < threshold:
            self.counters["misses"] += 1
            return None
        entry, sim = found[0]
        self.touch(entry.key)
        entry.hits += 1
        self.counters["hits"] += 1
        return Match(entry, sim)

    def lookup_sources(self, vector: np.ndarray, token_ids: np.ndarray, tenant: str = "default",
                       threshold: float = 0.3, k: int = 8, max_sources: int = 4, min_gain: float = 0.05,
                       min_sim: float = 0.1, ngram: int = 3) -> SourceCover | None:
        """Several entries of ``tenant`` that together cover the prompt ``token_ids``.

        The best ``k`` entries by cosine with similarity >= ``min_sim`` are candidates.
        The first source is the top-1 entry when it clears ``threshold`` (exactly what
        :meth:`lookup` returns), else the candidate covering most of the prompt's distinct
        ``ngram``-grams. Then, greedily, the candidate covering the most not-yet-covered
        n-grams is added while it adds at least ``min_gain`` (share of the prompt's
        distinct n-grams) and fewer than ``max_sources`` are chosen. A prompt covered well
        by one entry therefore gets that entry alone. Without a top-1 above
        ``threshold``, the chosen set must cover at least ``threshold`` of the prompt's
        n-grams, else it is a miss (None). Chosen entries are marked used.
        """
        from .fingerprint import ngram_hashes

        found = [(e, s) for e, s in self.search(vector, tenant, k=max(1, k))]
        top_ok = bool(found) and found[0][1] >= threshold
        cands = [(e, s) for i, (e, s) in enumerate(found) if s >= min_sim or (i == 0 and top_ok)]
        prompt = np.unique(ngram_hashes(np.asarray(token_ids, dtype=np.int64).reshape(-1), ngram))
        if not cands or (prompt.size == 0 and not top_ok):
            self.counters["misses"] += 1
            return None
        cover = [np.isin(prompt, self._entry_grams(e, ngram)) for e, _ in cands]
        total = max(1, prompt.size)
        any_cov = np.logical_or.reduce(cover) if cover else np.zeros(prompt.size, dtype=bool)
        first = 0 if top_ok else int(np.argmax([c.sum() for c in cover]))
        chosen, gains = [first], [float(cover[first].sum()) / total]
        covered = cover[first].copy()
        while len(chosen) < max_sources:
            best, best_gain = -1, 0
            for i, c in enumerate(cover):
                if i in chosen:
                    continue
                g = int((c & ~covered).sum())
                if g > best_gain:
                    best, best_gain = i, g
            if best < 0 or best_gain / total < min_gain:
                break
            chosen.append(best)
            gains.append(best_gain / total)
            covered |= cover[best]
        share = float(covered.sum()) / total
        if not top_ok and share < threshold:
            self.counters["misses"] += 1
            return None
        matches = []
        for i in chosen:
            entry, sim = cands[i]
            self.touch(entry.key)
            entry.hits += 1
            matches.append(Match(entry, sim))
        self.counters["hits"] += 1
        return SourceCover(matches, gains, share, len(cands), float(any_cov.sum()) / total)

    def _entry_grams(self, entry: IndexEntry, n: int) -> np.ndarray:
        from .fingerprint import ngram_hashes

        per = self._grams.setdefault(entry.key, {})
        g = per.get(n)
        if g is None:
            g = per[n] = np.unique(ngram_hashes(entry.token_ids, n))
        return g

    def touch(self, key: str) -> bool:
        """Mark ``key`` most recently used (last to be evicted); False when it is absent.

        Only the LRU order changes: hit counters are the caller's (``lookup`` counts its own).
        """
        if key not in self._entries:
            return False
        self._entries.move_to_end(key)
        return True

    def entries(self, tenant: str | None = None) -> list[IndexEntry]:
        """Entries (of ``tenant`` if given), least recently used first."""
        return [e for e in self._entries.values() if tenant is None or e.tenant == tenant]

    def get(self, key: str) -> IndexEntry | None:
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self, tenant: str | None = None) -> dict:
        """Global stats, or one namespace's (``entries``/``bytes``) with its owner's quota use
        (``owner``, ``owner_entries``, ``owner_bytes``: all the owner's namespaces together)."""
        if tenant is not None:
            owner = self.owner_of(tenant)
            return {"tenant": tenant, "entries": self._tenant_items.get(tenant, 0),
                    "bytes": self._tenant_bytes.get(tenant, 0), "owner": owner,
                    "owner_entries": self._owner_items.get(owner, 0), "owner_bytes": self._owner_bytes.get(owner, 0)}
        return {"entries": len(self._entries), "bytes": self._bytes, "max_items": self.max_items,
                "max_bytes": self.max_bytes, **self.counters,
                "tenants": {t: {"entries": c, "bytes": self._tenant_bytes[t]}
                            for t, c in self._tenant_items.items() if c},
                "owners": {o: {"entries": c, "bytes": self._owner_bytes[o]} for o, c in self._owner_items.items()},
                "namespaces": len(self._faiss)}

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        vec = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))
        if vec.shape[0] != self.dim:
            raise ValueError(f"vector has dim {vec.shape[0]}, index expects {self.dim}")
        if not np.all(np.isfinite(vec)):
            raise ValueError("vector has non-finite values")
        return vec
