"""Pre-packed bf16 linear layers for CPU decode.

A decode step multiplies a handful of rows (one per running request) by every weight
of the model, so it is bound by how fast the weights stream through. For bf16 on a CPU
``F.linear`` re-lays the weight out for oneDNN on every call; a weight re-laid out once
(``torch.ops.mkldnn._reorder_linear_weight``) and used through
``torch.ops.mkldnn._linear_pointwise`` halves that time (SmolLM2's 576 x 1536 MLP weight,
one thread, 1-16 rows: ~130 -> ~60 us) and gives bit-identical results for such small
inputs. Larger inputs (prefill chunks) keep the stock ``F.linear``: there the packed
kernel is not faster and rounds differently.

:func:`prepack_linears` patches ``forward`` of the model's ``nn.Linear`` modules in place
(parameters and ``state_dict`` are untouched; the packed copy costs the weights' size
again in host memory). It applies only where it helps: CPU, bfloat16 weights, and a
torch build whose oneDNN runs bf16.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MAX_PACKED_ROWS = 64  # inputs with more rows than this (prefill chunks) use F.linear


def prepack_supported(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: inductor packs the frozen weight itself (first, so that
        return F.linear(x, self.weight, self.bias)  # the row count is not compared: that would bound the graph)
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows > MAX_PACKED_ROWS or x.dtype != torch.bfloat16 or x.requires_grad:
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self._semshare_packed, self.bias, "none", [], "")


def prepack_linears(model: torch.nn.Module) -> int:
    """Patch every ``nn.Linear`` of ``model`` to use a pre-packed weight for small inputs;
    returns how many were patched (0 where unsupported)."""
    if not prepack_supported(model):
        return 0
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if type(mod) is not torch.nn.Linear or getattr(mod, "_semshare_packed", None) is not None:
                continue
            try:
                mod._semshare_packed = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach(), 1)
            except RuntimeError as e:  # a build without bf16 oneDNN: leave the rest as they are
                logger.info("pre-packing linear weights is not available here: %s", e)
                return n
            mod.forward = types.MethodType(_packed_forward, mod)
            n += 1
    return n
