from __future__ import annotations

import functools

import torch

from benchmarks.dataset import split_sentences
from semshare_core import SemShareConfig, SemShareEngine
from semshare_core.models import corpus_text, tiny_random_model, train_tiny_tokenizer

torch.set_num_threads(2)


@functools.lru_cache(maxsize=None)
def tokenizer():
    return train_tiny_tokenizer(512)


@functools.lru_cache(maxsize=None)
def tiny_engine(arch: str, rope: str = "default", sliding_window: int | None = None) -> SemShareEngine:
    scaling = None
    if rope == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
    tok = tokenizer()
    model = tiny_random_model(arch, vocab_size=len(tok), rope_scaling=scaling, sliding_window=sliding_window)
    # recompute_min_tokens=0: the prompts here are short; the tests check the selective mechanics
    return SemShareEngine(model, tok, SemShareConfig(window=1, recompute_min_tokens=0))


@functools.lru_cache(maxsize=None)
def sentences() -> tuple[str, ...]:
    return tuple(s for s in split_sentences(corpus_text()) if 40 < len(s) < 200)


def prose(start: int, count: int) -> list[str]:
    return list(sentences()[start:start + count])
