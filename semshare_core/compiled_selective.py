"""The decoder layers of a hit (selective prefill) compiled: one graph for every layer.

A hit runs layer 0 on every prompt token and each later layer on a shrinking set of
selected rows (:func:`semshare_core.prefill.selective_prefill`), so its shapes change
from layer to layer and the whole pass cannot be one graph as a full prefill is
(:mod:`semshare_core.compiled_prefill`). Profiled eagerly on one CPU core (SmolLM2 bf16,
a ~2.3k-token hit of 3-4 sources), about a third of its time is unfused elementwise work
(norms, rotary, SiLU, residuals, dtype round trips, the attention output's copy), which
is what inductor fuses. Here ONE decoder layer call is compiled:

* the layer is an argument of the compiled function, and its weights are graph inputs
  (dynamo lifts module parameters), so every layer of the model runs the same graph;
  the row count is dynamic, so one graph serves every layer's row count too;
* the layer runs without a cache object: its attention is ONE opaque custom op
  (``semshare::selective_attention``) that writes the rows' fresh K/V into the hit's
  :class:`~semshare_core.prefill.ScatterCache` (recording their deviation when the
  selection asks for it) and attends as the eager pass does (the model's causal
  attention when every row runs, else the position-ordered chunks of the current
  :class:`~semshare_core.attention.RowPlan`). The op reads which layer it is in, the
  cache and the plan from thread-local state the driver sets before each call, so the
  graph never depends on the layer index;
* the weights are not frozen (they are inputs), so the linear layers keep the eager
  matmuls: inductor's gain is the fused elementwise chains and fewer op dispatches.

Used where the compiled full prefill is (``compile_prefill``: bf16 on a CPU with a C++
compiler under ``auto``), not with pruning (its attention recorder reads every layer's
attention eagerly). A failure while tracing or compiling, before any cache changed,
logs once and the hit runs eagerly from then on. Compiled bf16 layers round differently
from eager ones (float32 kept between fused ops), as the compiled full prefill does.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import attention_impl
from .compiled_common import failure_text, fake_output

logger = logging.getLogger(__name__)

IMPL = "semshare_selective_compiled"
_STATE = threading.local()


@torch.library.custom_op("semshare::selective_attention", mutates_args=())
def selective_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One layer of a hit (opaque to the compiler): writes the selected rows' K/V
    ``[1, Hkv, s, D]`` into the thread's current :class:`ScatterCache` at the thread's
    current layer, then attends ``query [1, Hq, s, D]`` over the layer's ``n`` rows as
    the current plan says. Returns ``[1, s, Hq, D]``."""
    from .attention import _planned_attention

    st = _STATE
    st.touched = True
    kb, vb = st.cache.update(key, value, st.layer)
    plan = st.plan
    gqa = query.shape[1] != kb.shape[1]
    if plan is None or plan.full:
        out = F.scaled_dot_product_attention(query, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()
    return _planned_attention(None, query, kb, vb, plan, scale)


@selective_attention_op.register_fake
def _(query, key, value, scale):
    return fake_output(query)


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("compiled hit: attention softcap / sinks are not supported")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.semshare.selective_attention(query, key, value, scale), None


ALL_ATTENTION_FUNCTIONS.register(IMPL, _attention)


def _one_layer(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return layer(hidden, attention_mask=None, position_embeddings=(cos, sin))


class CompiledSelective:
    """One compiled decoder-layer call for the hits of ``model`` (see the module doc)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.failed: Optional[str] = None
        self.compiled_layers = 0
        self._fn = torch.compile(_one_layer, fullgraph=True, dynamic=None)

    @property
    def active(self) -> bool:
        return self.failed is None

    def layer(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
              cache, plan) -> Optional[torch.Tensor]:
        """Run decoder layer ``index`` on ``hidden [1, s, hidden]`` at the rows' rotary
        ``pe`` (``cos``, ``sin`` ``[1, s, D]``) against ``cache`` (a ScatterCache whose
        ``rows`` are set) with ``plan`` (None: every row, causal). None when the graph could
        not be compiled (nothing was written: the caller runs the layer eagerly), and for a
        single row."""
        if hidden.shape[1] < 2:  # dynamo specialises a size of 1: run it eagerly, not a second graph
            return None
        cos, sin = pe
        st = _STATE
        st.cache, st.layer, st.plan, st.touched = cache, index, plan, False
        for t in (hidden, cos, sin):
            torch._dynamo.mark_dynamic(t, 1)
        try:
            with torch.no_grad(), attention_impl(self.model, IMPL):
                out = self._fn(layer, hidden, cos, sin)
        except Exception as e:
            if st.touched:
                raise
            self.failed = failure_text(e)
            logger.warning("compiled hit layers unavailable (%s); hits run eagerly", self.failed)
            return None
        finally:
            st.cache = st.plan = None
        self.compiled_layers += 1
        return out
