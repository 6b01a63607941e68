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


def test_head_input_reads_the_hidden_state_the_served_logits_come_from():
    """``HeadInput`` records the last row the LM head reads: through the float32 head it
    gives the prefill's own logits (fp32 model: the same math), after a full prefill and
    after a hit; ``top2_margin`` is 0 on an exact tie."""
    from benchmarks.methods import HeadInput, top2_margin
    from tests.unit.tiny import tiny_engine

    eng = tiny_engine("llama")
    head = HeadInput(eng.model)
    try:
        ref = np.arange(5, 75, dtype=np.int64)
        full = eng.prefill(ref)
        torch.testing.assert_close(head.logits32(), full.logits.float(), rtol=1e-4, atol=1e-4)
        packed = eng.export_kv(full)
        ids = ref.copy()
        ids[40] = 3  # one edit: a hit on the reference
        hit = eng.prefill(ids, packed)
        assert hit.stats.hit
        torch.testing.assert_close(head.logits32(), hit.logits.float(), rtol=1e-4, atol=1e-4)
    finally:
        head.close()
    assert top2_margin(torch.tensor([1.0, 3.0, 3.0])) == 0.0
    assert top2_margin(torch.tensor([1.0, 3.5, 3.0])) == 0.5
