"""The RAG benchmark's numerical-floor method: a full prefill run in chunks through
``prefill_steps`` (what a served miss does) is drained to the same prompt's full prefill."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.rag import drain


def test_drained_chunked_prefill_is_the_full_prefill():
    from tests.unit.tiny import tiny_engine

    eng = tiny_engine("llama")
    ids = np.arange(5, 75, dtype=np.int64)
    full = eng.prefill(ids)
    gen = eng.prefill_steps(ids, chunk=16)
    chunked = drain(gen)
    assert chunked.stats.prompt_tokens == ids.size and chunked.stats.hit is False
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-4, atol=1e-4)  # fp32: same math
    assert [k.shape for k in chunked.keys] == [k.shape for k in full.keys]
