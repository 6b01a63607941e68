"""A hit's per-layer loop reads nothing back from the device (issue 16, item 8).

On a GPU every value read back to the host (``.item()``, ``int(t)``, ``.tolist()``,
``bool(t)``, ``nonzero``, boolean-mask indexing) waits for the device to finish all
queued work, so a read-back per layer serialises the selective loop. This counts them
on CPU with a ``TorchFunctionMode`` (the same calls sync on CUDA) and checks that the
count does not grow with the number of layers: the hit reads back a constant number of
values (the forced-row count and the layer-1 eligible count), whatever the depth.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from semshare_core import SemShareConfig, SemShareEngine
from semshare_core.models import tiny_random_model

from .tiny import prose, tokenizer

READ_BACKS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
              torch.Tensor.masked_select, torch.masked_select}


class ReadBackCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_BACKS:
            self.calls.append(getattr(func, "__name__", str(func)))
        elif func is torch.Tensor.__getitem__ and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.calls.append("bool-index")
        return func(*args, **kwargs)


def _engine(layers: int) -> SemShareEngine:
    tok = tokenizer()
    model = tiny_random_model("llama", vocab_size=len(tok), layers=layers)
    # one attention chunk (the GPU default): the plan must not read its bounds back
    cfg = SemShareConfig(window=1, recompute_min_tokens=0, recompute_ratio=0.5, recompute_floor=0.1,
                         attention_chunks=1)
    return SemShareEngine(model, tok, cfg, prepack=False)


def _read_backs(engine: SemShareEngine) -> list[str]:
    from semshare_core.prefill import selective_prefill

    tok = engine.tokenizer
    text = " ".join(prose(0, 12))
    edited = text.replace(prose(3, 1)[0], prose(40, 1)[0])
    ref_ids = np.asarray(tok(text)["input_ids"])
    ids = np.asarray(tok(edited)["input_ids"])
    ref = engine.export_kv(engine.prefill(ref_ids))
    # the same gather the engine does; only selective_prefill is counted
    calls: list[str] = []
    orig = selective_prefill

    def counted(*args, **kwargs):
        with ReadBackCounter() as c:
            out = orig(*args, **kwargs)
        calls.extend(c.calls)
        return out

    import semshare_core.engine as engine_mod
    mp = pytest.MonkeyPatch()
    mp.setattr(engine_mod, "selective_prefill", counted, raising=False)
    try:
        pre = engine.prefill(ids, reference=ref)
    finally:
        mp.undo()
    assert pre.stats.hit and pre.stats.reused_tokens > 0
    return calls


def test_read_backs_do_not_grow_with_depth():
    shallow, deep = _read_backs(_engine(4)), _read_backs(_engine(12))
    assert shallow, "the counter saw nothing: the hit did not run selective_prefill"
    assert len(deep) == len(shallow), (shallow, deep)
    assert len(deep) <= 3, deep


def test_the_counter_sees_a_per_layer_read_back():
    """The check can fail: a loop that reads a value back per layer is caught."""
    x = torch.arange(10)
    with ReadBackCounter() as c:
        for _ in range(4):
            int(x.sum())
            x[x > 3]
    assert len(c.calls) == 8
