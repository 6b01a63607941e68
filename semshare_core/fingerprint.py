"""Prompt fingerprints: the E-cache (token input embeddings) and the retrieval vector.

Retrieval signal. A plain mean of input embeddings does not separate real variants
from unrelated text of similar style (measured on SmolLM2: unrelated passages score
0.86-0.98 cosine, variants ~0.99), so the index key is a *lexical* one: a bag of token
n-grams, feature-hashed with a sign (collisions cancel in expectation) into
``dim`` buckets, weighted by sqrt(count), L2-normalised. The inner product of two
such vectors estimates the cosine between their n-gram count vectors: about the share
of n-grams they have in common, which also bounds how much KV can be reused exactly.
"""
from __future__ import annotations

import numpy as np
import torch



def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ngram_hashes(ids: np.ndarray | list[int], n: int) -> np.ndarray:
    """64-bit hashes of every contiguous ``n``-gram of ``ids`` (``[len(ids) - n + 1]``).

    Prompts shorter than ``n`` hash their whole token sequence as one gram.
    """
    a = np.asarray(ids, dtype=np.uint64).reshape(-1)
    if a.size == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, a.size)
    h = np.full(a.size - n + 1, np.uint64(n), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = _mix64(h ^ (a[j:a.size - n + 1 + j] + np.uint64(0x9E3779B97F4A7C15)))
    return h


def prompt_vector(ids: np.ndarray | list[int], n: int = 3, dim: int = 4096) -> np.ndarray:
    """Retrieval vector of a prompt: ``float32 [dim]``, unit L2 norm (zeros if empty)."""
    h = ngram_hashes(ids, n)
    vec = np.zeros(dim, dtype=np.float64)
    if h.size:
        uniq, counts = np.unique(h, return_counts=True)  # sqrt(tf) per distinct gram
        buckets = (uniq % np.uint64(dim)).astype(np.int64)
        signs = np.where((uniq >> np.uint64(63)) & np.uint64(1), -1.0, 1.0)
        np.add.at(vec, buckets, signs * np.sqrt(counts))
    norm = np.linalg.norm(vec)
    if norm > 0:
        vec /= norm
    return vec.astype(np.float32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two prompt vectors (they are unit-norm)."""
    return float(np.dot(a, b))


@torch.no_grad()
def token_embeddings(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """E-cache: the model's own input embeddings of ``ids`` ``[n]`` -> ``float32 [n, hidden]``."""
    emb = model.get_input_embeddings()
    return emb(ids.to(emb.weight.device).reshape(-1)).float()
