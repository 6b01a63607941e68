"""Packed KV: the unit the index stores and the object store ships.

``data`` is one contiguous numpy array ``[layers, 2, kv_heads, seq, head_dim]``
(axis 1: 0 = keys after RoPE at the prompt's own positions, 1 = values). bfloat16
has no numpy dtype, so it travels as ``uint16`` bits with ``dtype="bfloat16"``.
A :class:`ModelSignature` says which model produced it; KV from another model is
refused (:class:`KVMismatchError`), never silently used.

:meth:`PackedKV.to_bytes` / :meth:`PackedKV.from_bytes` give a self-checking wire
format (magic, JSON header, payload, CRC32) for anything that leaves the process
as raw bytes; corrupted or truncated blobs raise :class:`KVFormatError`.
"""
from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

_MAGIC = b"SSKV1\0"
# values sampled (strided) from every floating-point tensor of the model for its signature
_SIGNATURE_SAMPLES = 1024
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVMismatchError(ValueError):
    """Packed KV was produced by a different model (signature differs)."""


class KVFormatError(ValueError):
    """Packed KV bytes or arrays are malformed, truncated or corrupted."""


@dataclass(frozen=True)
class ModelSignature:
    """What a KV cache depends on: architecture, shapes, RoPE and the weights.

    ``weights``: SHA-256 (first 16 hex digits) over every floating-point tensor of the
    model's state dict: its name, shape and a strided sample of 1,024 values. A fine-tune
    that differs anywhere (a deep layer included) gets another signature, unless its
    change avoids every sampled value of every tensor.
    """

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: str
    weights: str

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelSignature":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None),
                                                           "rope_scaling": getattr(cfg, "rope_scaling", None)}
        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in sorted(model.state_dict(keep_vars=False).items()):
                if not torch.is_floating_point(p):
                    continue
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // _SIGNATURE_SAMPLES)
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(flat[::step][:_SIGNATURE_SAMPLES].float().cpu().numpy().tobytes())
        return cls(architecture=type(model).__name__, num_layers=cfg.num_hidden_layers,
                   num_kv_heads=cfg.num_key_value_heads, head_dim=int(head_dim),
                   hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                   rope=json.dumps(rope, sort_keys=True, default=str), weights=h.hexdigest()[:16])

    def check(self, other: "ModelSignature") -> None:
        """Raise :class:`KVMismatchError` naming every field that differs."""
        if other == self:
            return
        diff = [f"{k}: cache has {v!r}, model has {getattr(self, k)!r}"
                for k, v in asdict(other).items() if getattr(self, k) != v]
        raise KVMismatchError("reference KV was produced by a different model (" + "; ".join(diff) + ")")


@dataclass(frozen=True)
class PackedKV:
    """KV of one prompt. ``data``: ``[layers, 2, kv_heads, seq, head_dim]``; ``token_ids``: int64 ``[seq]``.

    ``last_logits``: float32 ``[vocab]``, the first-token logits that go with ``data``: an
    identical prompt is answered by replaying them (no prefill). ``exact``: ``data`` and
    ``last_logits`` are exactly what a full prefill of ``token_ids`` computes (a replay
    then equals a full prefill); False for the KV of a semantic hit (a replay then
    reproduces that hit's answer).
    """

    data: np.ndarray
    dtype: str
    token_ids: np.ndarray
    signature: ModelSignature
    last_logits: np.ndarray | None = None
    exact: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        s, d = self.signature, self.data
        if self.dtype not in _NP_DTYPES:
            raise KVFormatError(f"unsupported KV dtype {self.dtype!r}")
        if d.dtype != np.dtype(_NP_DTYPES[self.dtype]):
            raise KVFormatError(f"array dtype {d.dtype} does not match declared {self.dtype}")
        want = (s.num_layers, 2, s.num_kv_heads, self.seq_len, s.head_dim)
        if d.ndim != 5 or tuple(d.shape) != want:
            raise KVFormatError(f"KV array shape {tuple(d.shape)} != expected {want}")
        if self.token_ids.ndim != 1:
            raise KVFormatError("token_ids must be one-dimensional")
        if self.last_logits is not None and (self.last_logits.shape != (s.vocab_size,)
                                             or self.last_logits.dtype != np.float32):
            raise KVFormatError(f"last_logits must be float32 [{s.vocab_size}]")

    @property
    def seq_len(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.token_ids.nbytes + (0 if self.last_logits is None else self.last_logits.nbytes))

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, torch.Tensor]], token_ids, signature: ModelSignature,
                    last_logits: torch.Tensor | None = None, exact: bool = True) -> "PackedKV":
        """Pack per-layer ``(K, V)``, each ``[1, kv_heads, seq, head_dim]`` (+ first-token logits)."""
        k0 = layers[0][0]
        # one copy into the packed layout (a nested torch.stack copies every row twice)
        t = torch.empty((len(layers), 2, *k0.shape[1:]), dtype=k0.dtype, device="cpu")  # [L, 2, H, n, D]
        for i, (k, v) in enumerate(layers):
            t[i, 0].copy_(k[0].detach())
            t[i, 1].copy_(v[0].detach())
        name = next(k for k, v in _TORCH_DTYPES.items() if v == t.dtype)
        arr = t.view(torch.uint16).numpy() if name == "bfloat16" else t.numpy()
        logits = None if last_logits is None else last_logits.detach().float().cpu().numpy().copy()
        return cls(np.ascontiguousarray(arr), name, np.asarray(token_ids, dtype=np.int64).reshape(-1).copy(), signature,
                   logits, bool(exact))

    def to_torch(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[layers, 2, kv_heads, seq, head_dim]`` tensor (shares memory on CPU when it can)."""
        with warnings.catch_warnings():  # read-only arrays from the object store
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self.data)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(device=device, dtype=dtype or t.dtype)

    # wire format ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = json.dumps({"dtype": self.dtype, "seq": self.seq_len, "signature": asdict(self.signature),
                             "logits": self.last_logits is not None, "exact": bool(self.exact)}).encode()
        logits = b"" if self.last_logits is None else self.last_logits.astype("<f4").tobytes()
        payload = self.token_ids.astype("<i8").tobytes() + logits + np.ascontiguousarray(self.data).tobytes()
        body = struct.pack("<I", len(header)) + header + payload
        return _MAGIC + body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "PackedKV":
        try:
            if len(blob) < len(_MAGIC) + 8 or not blob.startswith(_MAGIC):
                raise KVFormatError("not a packed KV blob (bad magic or too short)")
            body, crc = blob[len(_MAGIC):-4], struct.unpack("<I", blob[-4:])[0]
            if zlib.crc32(body) != crc:
                raise KVFormatError("packed KV checksum mismatch (corrupted or truncated)")
            (hlen,) = struct.unpack("<I", body[:4])
            header = json.loads(body[4:4 + hlen].decode())
            sig = ModelSignature(**header["signature"])
            seq, dtype = int(header["seq"]), header["dtype"]
            if dtype not in _NP_DTYPES or seq < 0:
                raise KVFormatError(f"bad header dtype={dtype!r} seq={seq}")
            off = 4 + hlen
            ids = np.frombuffer(body, dtype="<i8", count=seq, offset=off).astype(np.int64)
            off += 8 * seq
            logits = None
            if header.get("logits"):
                logits = np.frombuffer(body, dtype="<f4", count=sig.vocab_size, offset=off).astype(np.float32)
                off += 4 * sig.vocab_size
            shape = (sig.num_layers, 2, sig.num_kv_heads, seq, sig.head_dim)
            npdt = np.dtype(_NP_DTYPES[dtype])
            need = int(np.prod(shape)) * npdt.itemsize
            rest = body[off:]
            if len(rest) != need:
                raise KVFormatError(f"payload has {len(rest)} bytes, expected {need}")
            data = np.frombuffer(rest, dtype=npdt).reshape(shape)
            return cls(data, dtype, ids, sig, logits, bool(header.get("exact", True)))
        except KVFormatError:
            raise
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KVFormatError(f"malformed packed KV: {e}") from e
