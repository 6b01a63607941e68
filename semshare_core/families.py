"""Which decoder families the method supports, and what differs between them.

The selective prefill (:mod:`semshare_core.prefill`), the layer-1 selection probe and
key re-rotation (:mod:`semshare_core.rope`) call the stock decoder layers, but they also
reach into a layer's attention (the probe runs ``k_proj``/``v_proj`` itself) and rely on
every layer attending the same way. :func:`family_of` checks that once, at load
(:func:`semshare_core.models.load_local`, from the config, before any weight is read)
and in the engine constructor (from the model), and returns a :class:`Family` that the
prefill reads instead of poking at the config again.

Supported: Llama, Mistral (with or without a sliding window), Qwen2 (biased QKV) and
Qwen3 (``q_norm``/``k_norm`` per head before RoPE). Refused, with every reason named:
other model types; attention-logit or final-logit softcapping (Gemma-2: the selective
attention and the first-token logits would skip it); layers that attend differently
(alternating sliding / full windows, chunked attention); a fused QKV projection; a
rotary embedding whose frequencies depend on the sequence length (``dynamic``,
``longrope``: re-rotating a cached key is not exact); no rotary embedding at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# rope types whose frequencies depend on the sequence length: a cached key re-rotated to
# a new position is not the key a full prefill computes
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """The model's architecture is outside what the method handles exactly."""


@dataclass(frozen=True)
class Family:
    """What the prefill needs to know about a supported decoder.

    ``sliding_window``: the window every layer applies (None: full attention). ``qk_norm``:
    per-head RMSNorm on queries and keys after the projections, before RoPE (Qwen3).
    """

    name: str
    sliding_window: int | None
    qk_norm: bool


def _rope_types(cfg) -> set[str]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params or "type" in params:
        return {str(params.get("rope_type", params.get("type")))}
    # per-layer-type rope parameters: {"full_attention": {...}, "sliding_attention": {...}}
    return {str(p.get("rope_type", p.get("type", "default"))) for p in params.values() if isinstance(p, dict)}


def config_problems(cfg) -> tuple[list[str], int | None]:
    """Everything in a config that the method cannot do exactly, and the sliding window."""
    problems: list[str] = []
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED:
        problems.append(f"model type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, field, None):
            problems.append(f"{field.replace('_', ' ')} ({field}={getattr(cfg, field)})")
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        kinds = set(types)
        if kinds == {"full_attention"}:
            window = None
        elif kinds != {"sliding_attention"}:
            counts = ", ".join(f"{types.count(k)} {k}" for k in sorted(kinds))
            problems.append(f"layers that attend differently ({counts}): alternating sliding windows "
                            "or chunked attention")
    if getattr(cfg, "attention_chunk_size", None):
        problems.append(f"chunked attention (attention_chunk_size={cfg.attention_chunk_size})")
    bad_rope = sorted(t for t in _rope_types(cfg) if t in LENGTH_DEPENDENT_ROPE)
    if bad_rope:
        problems.append(f"rope type {bad_rope[0]!r}: its frequencies depend on the sequence length, so re-rotating "
                        "cached keys is not exact")
    return problems, (int(window) if window else None)


def _refuse(what: str, problems: list[str]) -> None:
    raise UnsupportedModelError(f"{what} is not supported: " + "; ".join(problems))


def check_config(cfg, what: str | None = None) -> Family:
    """The :class:`Family` of a transformers config, or :class:`UnsupportedModelError` naming every problem."""
    problems, window = config_problems(cfg)
    if problems:
        _refuse(what or f"model type {getattr(cfg, 'model_type', None)!r}", problems)
    return Family(str(cfg.model_type), window, qk_norm=cfg.model_type == "qwen3")


def family_of(model: torch.nn.Module) -> Family:
    """:func:`check_config` plus what only the modules show (fused QKV, no rotary embedding)."""
    cfg = model.config
    what = type(model).__name__
    problems, window = config_problems(cfg)
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0:
        problems.append("no decoder layers at model.model.layers")
    else:
        attn = getattr(layers[0], "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            fused = [p for p in ("qkv_proj", "Wqkv", "c_attn", "query_key_value") if hasattr(attn, p)]
            problems.append("fused QKV projection" + (f" ({fused[0]})" if fused else "")
                            + ": the selection probe needs separate q_proj/k_proj/v_proj")
        if not hasattr(layers[0], "input_layernorm"):
            problems.append("no input_layernorm on the decoder layer")
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        problems.append("no rotary embedding (only RoPE decoders are supported)")
    elif getattr(rot, "rope_type", "default") in LENGTH_DEPENDENT_ROPE and not any("rope type" in p for p in problems):
        problems.append(f"rope type {rot.rope_type!r}: its frequencies depend on the sequence length")
    if problems:
        _refuse(what, problems)
    qk_norm = bool(layers is not None and hasattr(layers[0].self_attn, "k_norm"))
    return Family(str(cfg.model_type), window, qk_norm)
