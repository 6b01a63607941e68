"""Prompt vectors, sampling and config validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core import SemShareConfig, prompt_vector, similarity
from semshare_core.engine import sample_token
from semshare_core.fingerprint import ngram_hashes


def test_prompt_vector_is_deterministic_unit_and_order_sensitive():
    ids = np.arange(100)
    a, b = prompt_vector(ids), prompt_vector(ids.copy())
    assert np.array_equal(a, b) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-6)
    assert similarity(a, prompt_vector(ids[::-1])) < 0.2      # 3-grams reversed are different grams
    assert similarity(a, prompt_vector(np.concatenate([ids[50:], ids[:50]]))) > 0.95
    assert np.count_nonzero(prompt_vector([])) == 0
    assert ngram_hashes([5], 3).shape == (1,)


def test_similarity_tracks_overlap():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 30000, 1000)
    sims = []
    for frac in (0.1, 0.3, 0.5):
        v = base.copy()
        k = int(frac * v.size)
        v[:k] = rng.integers(0, 30000, k)
        sims.append(similarity(prompt_vector(base), prompt_vector(v)))
    unrelated = similarity(prompt_vector(base), prompt_vector(rng.integers(0, 30000, 1000)))
    assert sims[0] > sims[1] > sims[2] > 0.3 > 0.05 > unrelated


def test_sampling_greedy_and_top_p():
    logits = torch.tensor([0.0, 5.0, 4.9, -10.0])
    assert sample_token(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, 0.5, g) for _ in range(50)}
    assert draws == {1}            # top-p 0.5 keeps only the most likely token
    draws = {sample_token(logits, 1.0, 0.99, g) for _ in range(200)}
    assert draws == {1, 2}


@pytest.mark.parametrize("bad", [dict(recompute_ratio=1.5), dict(retention=0.0), dict(sim_threshold=2),
                                 dict(window=0), dict(recompute_decay=0), dict(ngram=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="SemShareConfig"):
        SemShareConfig(**bad)


def test_config_from_dict_rejects_unknown_fields():
    assert SemShareConfig.from_dict({"recompute_ratio": 0.2}).recompute_ratio == 0.2
    with pytest.raises(ValueError, match="unknown"):
        SemShareConfig.from_dict({"recompute": 0.2})


def test_retention_schedule_decays_with_depth():
    cfg = SemShareConfig(retention=0.25)
    shares = [cfg.retention_share(l, 5) for l in range(5)]
    assert shares[0] == 1.0 and shares[-1] == pytest.approx(0.25) and shares == sorted(shares, reverse=True)
    assert SemShareConfig().retention_share(3, 5) == 1.0


def test_auto_attention_chunks_follow_the_selected_rows():
    from semshare_core.config import CPU_MAX_CHUNKS, CPU_ROWS_PER_CHUNK

    cfg = SemShareConfig()
    cpu = torch.device("cpu")
    counts = [cfg.chunks_for(cpu, r) for r in (1, 50, 2 * CPU_ROWS_PER_CHUNK, 4 * CPU_ROWS_PER_CHUNK, 10_000)]
    assert counts == [1, 1, 2, 4, CPU_MAX_CHUNKS]
    assert cfg.chunks_for(torch.device("cuda"), 10_000) == 1  # one call on an accelerator
    assert cfg.with_(attention_chunks=3).chunks_for(cpu, 10_000) == 3  # an explicit count wins
