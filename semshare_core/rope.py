"""Re-rotating reused keys from reference positions to target positions.

RoPE rotates each (pair of) key dimension(s) by ``position * inv_freq``. Rotations
compose, so a key cached at reference position ``p_R`` becomes the key a full prefill
would produce at ``p_P`` by one more rotation of ``p_P - p_R`` (negative deltas are
fine). The model's own ``rotary_emb`` computes the angles, so Llama-3 rope scaling,
Mistral and plain RoPE are all handled by the model's code; only the
``attention_scaling`` factor (YaRN-style ropes) is divided out, or it would be
applied twice. Dynamic rope types, whose frequencies depend on sequence length, are
refused.
"""
from __future__ import annotations

import sys

import torch

_LENGTH_DEPENDENT = {"dynamic", "longrope"}


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        raise TypeError(f"{type(model).__name__} has no rotary_emb: only RoPE decoders are supported")
    return rot


def apply_rotary_fn(model: torch.nn.Module):
    """The model family's own ``apply_rotary_pos_emb`` (from its modeling module)."""
    for cls in type(model).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
        if fn is not None:
            return fn
    raise TypeError(f"no apply_rotary_pos_emb found for {type(model).__name__}")


def check_rope_supported(model: torch.nn.Module) -> None:
    rope_type = getattr(rotary_module(model), "rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT:
        raise ValueError(f"rope type {rope_type!r} depends on sequence length; key re-rotation is not exact")


@torch.no_grad()
def rerotate_keys(keys: torch.Tensor, delta: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Rotate ``keys`` ``[..., heads, n, head_dim]`` by ``delta`` ``[n]`` positions.

    Computed in float32 and returned in ``keys.dtype``.
    """
    rot = rotary_module(model)
    apply = apply_rotary_fn(model)
    x = keys.float()
    dummy = torch.empty(1, 1, 1, dtype=torch.float32, device=keys.device)
    cos, sin = rot(dummy, delta.to(keys.device).reshape(1, -1))  # [1, n, head_dim]
    cos, sin = cos.float(), sin.float()
    scale = float(getattr(rot, "attention_scaling", 1.0))
    if scale != 1.0:
        cos, sin = cos / scale, sin / scale
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])  # [B, heads, n, head_dim]
    _, out = apply(flat, flat, cos, sin)
    return out.reshape(*lead, *out.shape[-3:]).to(keys.dtype)
