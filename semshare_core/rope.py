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


def _rotate_half_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for the half-split layout, in 4 fused passes.

    ``x`` float32 ``[..., n, D]``; ``cos``/``sin`` ``[n, D]`` (halves duplicated).
    """
    h = x.shape[-1] // 2
    c, s = cos[:, :h], sin[:, :h]
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    torch.mul(x1, c, out=out[..., :h])
    out[..., :h].addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out[..., h:])
    out[..., h:].addcmul_(x1, s)
    return out


def _uses_half_split(model: torch.nn.Module) -> bool:
    """Check once that the model's own ``apply_rotary_pos_emb`` is the half-split rotation."""
    apply = apply_rotary_fn(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 8, generator=g)
    ang = torch.randn(5, 4, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    _, ref = apply(x, x, cos[None], sin[None])
    return torch.allclose(ref, _rotate_half_inplace(x, cos, sin), atol=1e-6)


class Rerotator:
    """Rotates reused keys by position deltas with the model's own rotary embedding.

    Built once per model. The rotation uses a fused half-split kernel when the model's
    ``apply_rotary_pos_emb`` is verified to be that rotation (Llama, Mistral), else the
    model's function itself.
    """

    def __init__(self, model: torch.nn.Module):
        check_rope_supported(model)
        self.model = model
        self.rot = rotary_module(model)
        self.apply = apply_rotary_fn(model)
        self.fast = _uses_half_split(model)

    def angles(self, delta: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos``/``sin`` ``[n, head_dim]`` of a rotation by ``delta`` ``[n]`` positions."""
        dummy = torch.empty(1, 1, 1, dtype=torch.float32, device=device)
        cos, sin = self.rot(dummy, delta.to(device).reshape(1, -1))  # [1, n, head_dim]
        cos, sin = cos[0].float(), sin[0].float()
        scale = float(getattr(self.rot, "attention_scaling", 1.0))
        if scale != 1.0:
            cos, sin = cos / scale, sin / scale
        return cos, sin

    def _rotate_float(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[heads, n, head_dim]`` rotated, in float32."""
        xf = x.float()
        if self.fast:
            return _rotate_half_inplace(xf, cos, sin)
        _, out = self.apply(xf[None], xf[None], cos[None], sin[None])
        return out[0]

    @torch.no_grad()
    def __call__(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` ``[..., heads, n, head_dim]`` by ``delta`` ``[n]`` positions (a new tensor)."""
        return self.rotate_(keys.clone(), delta)

    @torch.no_grad()
    def rotate_(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` ``[..., heads, n, head_dim]`` in place by ``delta`` ``[n]`` positions.

        Computed in float32 one ``[heads, n, head_dim]`` slice at a time (e.g. one layer:
        the float copy stays in cache; 2.5x faster than one pass over all layers on CPU)
        and written back in ``keys.dtype``.
        """
        cos, sin = self.angles(delta, keys.device)
        return self.rotate_angles_(keys, cos, sin)

    @torch.no_grad()
    def rotate_angles_(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:meth:`rotate_` with the angles precomputed by :meth:`angles` (e.g. once for all layers)."""
        flat = keys.view(-1, *keys.shape[-3:])  # a view (raises otherwise): writes land in ``keys``
        for i in range(flat.shape[0]):
            flat[i].copy_(self._rotate_float(flat[i], cos, sin))  # one rounding to keys.dtype, in place
        return keys


def rerotate_keys(keys: torch.Tensor, delta: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """One-off convenience: ``Rerotator(model)(keys, delta)``."""
    return Rerotator(model)(keys, delta)
