"""Checks on a reference KV fetched from the object store, before the engine touches it.

An index entry's object is normally a :class:`~semshare_core.PackedKV` put by the
index actor, but whatever comes back is treated as untrusted: it may be the raw wire
format (``PackedKV.to_bytes``, CRC-checked), something else entirely, a PackedKV
whose arrays were truncated or corrupted at rest (unpickling does not run
``__post_init__``), or KV of another model. :func:`load_reference` returns a PackedKV
the engine can use, or raises :class:`KVFormatError` (malformed, truncated,
corrupted, non-finite KV or first-token logits) / :class:`KVMismatchError` (another
model). Callers fall back to a full prefill on either, and report the entry.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from semshare_core import KVFormatError, PackedKV
from semshare_core.kv import ModelSignature


def load_reference(obj: Any, signature: ModelSignature, expected_tokens: Optional[int] = None) -> PackedKV:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        packed = PackedKV.from_bytes(bytes(obj))
    elif isinstance(obj, PackedKV):
        packed = obj
    else:
        raise KVFormatError(f"reference KV is a {type(obj).__name__}, not a PackedKV")
    sig = getattr(packed, "signature", None)
    data = getattr(packed, "data", None)
    ids = getattr(packed, "token_ids", None)
    if not isinstance(sig, ModelSignature) or not isinstance(data, np.ndarray) or not isinstance(ids, np.ndarray):
        raise KVFormatError("reference KV is missing its signature, data or token ids")
    if not isinstance(getattr(packed, "dtype", None), str):
        raise KVFormatError("reference KV has no dtype name")
    try:
        packed.validate()  # dtype and [layers, 2, kv_heads, seq, head_dim] against its own signature
    except KVFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - odd field types inside a corrupted signature
        raise KVFormatError(f"reference KV does not validate: {type(e).__name__}") from None
    signature.check(sig)  # KVMismatchError: another model
    if ids.dtype != np.int64:
        raise KVFormatError(f"token ids are {ids.dtype}, expected int64")
    n = packed.seq_len
    if n == 0:
        raise KVFormatError("reference KV is empty")
    if expected_tokens is not None and n != expected_tokens:
        raise KVFormatError(f"reference KV has {n} tokens, the index entry {expected_tokens}")
    if int(ids.min()) < 0 or int(ids.max()) >= signature.vocab_size:
        raise KVFormatError("reference token ids are outside the vocabulary")
    # one reduction instead of an elementwise scan (~50x faster on the CPU, no temporary):
    # any NaN / inf makes the sum non-finite; finite values whose sum overflows (|sum| >
    # 3e38, never real KV) are rejected too, which only costs a miss
    if not bool(torch.isfinite(packed.to_torch().sum())):
        raise KVFormatError("reference KV holds non-finite values")
    logits = getattr(packed, "last_logits", None)
    if logits is not None:  # replayed as the first token's distribution: must be sane
        if not isinstance(logits, np.ndarray) or logits.shape != (signature.vocab_size,) or logits.dtype != np.float32:
            raise KVFormatError("reference first-token logits are malformed")
        if not bool(np.isfinite(logits).all()):
            raise KVFormatError("reference first-token logits hold non-finite values")
    return packed
