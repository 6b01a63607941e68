"""The replica's reference-KV check (serve_app.kvcheck) on damaged objects, without Ray:
whatever arrives, it either returns a PackedKV the engine can prefill with, or raises
KVFormatError / KVMismatchError (the server then runs a full prefill)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semshare_core import KVFormatError, KVMismatchError, PackedKV
from serve_app.kvcheck import load_reference


@pytest.fixture(scope="module")
def setup():
    from semshare_core import SemShareEngine
    from semshare_core.models import corpus_text, tiny_random

    lm = tiny_random("llama")
    eng = SemShareEngine(lm.model, lm.tokenizer)
    ids = eng.encode(" ".join(corpus_text()[7000:7400].split()))
    packed = eng.export_kv(eng.prefill(ids))
    return eng, ids, packed, packed.to_bytes()


def _raw(packed: PackedKV, **fields) -> PackedKV:
    """A PackedKV built without validation (what unpickling a damaged object gives)."""
    obj = object.__new__(PackedKV)
    for name in ("data", "dtype", "token_ids", "signature"):
        object.__setattr__(obj, name, fields.get(name, getattr(packed, name)))
    return obj


def test_good_reference_both_forms(setup):
    eng, ids, packed, blob = setup
    for obj in (packed, blob, bytearray(blob), memoryview(blob)):
        got = load_reference(obj, eng.signature, ids.size)
        assert eng.prefill(ids, got).stats.hit


def test_damaged_references_are_rejected(setup):
    eng, ids, packed, blob = setup
    half = packed.data.shape[3] // 2
    nan = packed.data.copy()
    nan[0, 0, 0, 0, 0] = np.nan
    cases = [
        (None, KVFormatError), (42, KVFormatError), ({"data": 1}, KVFormatError),
        (blob[:-1], KVFormatError), (blob[: len(blob) // 2], KVFormatError), (b"", KVFormatError),
        (_raw(packed, data=np.ascontiguousarray(packed.data[:, :, :, :half])), KVFormatError),
        (_raw(packed, data=None), KVFormatError),
        (_raw(packed, token_ids=packed.token_ids.astype(np.int32)), KVFormatError),
        (_raw(packed, token_ids=packed.token_ids + 10**6), KVFormatError),
        (_raw(packed, data=nan), KVFormatError),
        (_raw(packed, dtype="int8"), KVFormatError),
        (_raw(packed, signature=replace(packed.signature, weights="0" * 16)), KVMismatchError),
    ]
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    cases.append((bytes(flipped), KVFormatError))
    for obj, exc in cases:
        with pytest.raises(exc):
            load_reference(obj, eng.signature, ids.size)
    with pytest.raises(KVFormatError):  # size differs from the index entry's
        load_reference(packed, eng.signature, ids.size + 1)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_mutation_is_rejected_or_usable(setup, data):
    eng, ids, packed, blob = setup
    kind = data.draw(st.sampled_from(["random", "flip", "cut", "splice"]))
    if kind == "random":
        obj = data.draw(st.binary(max_size=2048))
        if data.draw(st.booleans()):
            obj = blob[:6] + obj  # right magic, garbage after
    elif kind == "flip":
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
        obj = bytes(b)
    elif kind == "cut":
        obj = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        i = data.draw(st.integers(0, len(blob)))
        obj = blob[:i] + data.draw(st.binary(min_size=1, max_size=64)) + blob[i:]
    try:
        got = load_reference(obj, eng.signature, ids.size)
    except (KVFormatError, KVMismatchError):
        return
    eng.prefill(ids, got)  # accepted: must be usable
