"""The prefill strategies compared by the benchmark, and the untimed quality probes.

Every runner takes the engine, the target ids, a :class:`Reference` (the stored reference
prompt: packed KV as bytes, as host numpy, or already on the device) and the method's
resolved :class:`SemShareConfig`, and returns ``(PrefillResult, timings)`` where
``timings`` holds ``fetch_ms`` (getting the reference KV into a usable form: only the
``bytes`` placement parses anything). The caller times the whole call plus sampling the
first token: that is the TTFT.

* ``full``: :meth:`SemShareEngine.prefill` without a reference (exactly ``generate``).
* ``prefix``: block-granular exact-prefix reuse, what vLLM / SGLang prefix caching does:
  the longest common token prefix rounded down to whole blocks (``block`` tokens, 16 by
  default) is reused only when at least one block matches; its KV rows go into a
  ``DynamicCache`` and the rest of the prompt runs through ``model.forward`` on top. With
  less than one block in common it is a plain full prefill (``hit: false``).
* ``semshare``: :meth:`SemShareEngine.prefill` with the reference and the method's config
  (``SemShareConfig.with_(**overrides)``); with ``placement == "device"`` the reference KV
  is passed as ``reference_kv`` (gather on the device).

Only submodules of ``semshare_core`` are imported (no faiss; the GPU image lacks it).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from semshare_core.config import SemShareConfig
from semshare_core.engine import PrefillResult, PrefillStats, SemShareEngine
from semshare_core.kv import PackedKV
from semshare_core.prefill import cache_kwarg

PLACEMENTS = ("bytes", "host", "device")
KINDS = ("full", "prefix", "semshare")
DEFAULT_BLOCK = 16


@dataclass(frozen=True)
class MethodSpec:
    """A benchmarked strategy. ``kind``: full, prefix or semshare; ``overrides``: fields of
    :class:`SemShareConfig` changed from the engine's config (semshare only); ``group``:
    ``base`` (the default set), ``sweep`` (``--sweep``) or ``memory`` (retention sweep)."""

    name: str
    kind: str
    overrides: dict = field(default_factory=dict)
    group: str = "base"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.overrides and self.kind != "semshare":
            raise ValueError(f"method {self.name!r}: only semshare methods take config overrides")


def method_specs(pruned_retention: float = 0.5, extra_retentions: tuple[float, ...] = (),
                 sweep: dict[str, dict] | None = None) -> dict[str, MethodSpec]:
    """Every known method: the base set, ``semshare_ret<r>`` for the memory sweep and the sweep entries."""
    specs = {
        "full": MethodSpec("full", "full"),
        "prefix": MethodSpec("prefix", "prefix"),
        "semshare": MethodSpec("semshare", "semshare"),
        "semshare_r0": MethodSpec("semshare_r0", "semshare", {"recompute_ratio": 0.0, "recompute_min_tokens": 0}),
        "semshare_r1": MethodSpec("semshare_r1", "semshare", {"recompute_ratio": 1.0}),
        "semshare_pruned": MethodSpec("semshare_pruned", "semshare", {"retention": pruned_retention}),
    }
    for r in extra_retentions:
        name = f"semshare_ret{r:g}"
        specs[name] = MethodSpec(name, "semshare", {"retention": r}, group="memory")
    for name, overrides in (sweep or {}).items():
        if name in specs:
            raise ValueError(f"sweep entry {name!r} has the name of a built-in method; rename it")
        specs[name] = MethodSpec(name, "semshare", dict(overrides), group="sweep")
    return specs


def resolve_config(base: SemShareConfig, spec: MethodSpec) -> SemShareConfig:
    """``base.with_(**spec.overrides)``; an unknown field or a bad value raises ``ValueError``
    naming the method (``with_`` itself raises ``TypeError`` / ``ValueError``)."""
    try:
        return base.with_(**spec.overrides) if spec.overrides else base
    except (TypeError, ValueError) as e:
        known = ", ".join(f.name for f in dataclasses.fields(base))
        raise ValueError(f"method {spec.name!r}: bad SemShareConfig overrides {spec.overrides}: {e}. "
                         f"Known fields: {known}") from e


@dataclass
class Reference:
    """A stored reference prompt. ``blob``: wire bytes (placement ``bytes``);
    ``packed``: host numpy (placement ``host``, and always for the token ids);
    ``on_device``: ``[L, 2, H, m, D]`` tensor already on the accelerator (``device``)."""

    ids: np.ndarray
    packed: PackedKV
    blob: bytes | None = None
    on_device: torch.Tensor | None = None
    placement: str = "host"

    @property
    def kv_bytes(self) -> int:
        return self.packed.nbytes


def make_reference(eng: SemShareEngine, ids: np.ndarray, placement: str) -> Reference:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    pre = eng.prefill(ids)
    packed = eng.export_kv(pre)
    ref = Reference(ids=ids, packed=packed, placement=placement)
    if placement == "bytes":
        ref.blob = packed.to_bytes()
    elif placement == "device":
        ref.on_device = packed.to_torch(eng.device)
    del pre
    return ref


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fetch(ref: Reference) -> tuple[PackedKV, float]:
    """The reference as a :class:`PackedKV` and the time it took (bytes are parsed + CRC-checked)."""
    if ref.placement != "bytes":
        return ref.packed, 0.0  # host numpy (zero-copy from the object store) or already on the device
    t0 = time.perf_counter()
    packed = PackedKV.from_bytes(ref.blob)
    return packed, (time.perf_counter() - t0) * 1e3


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(a.size, b.size)
    neq = np.nonzero(a[:m] != b[:m])[0]
    return int(neq[0]) if neq.size else m


def reusable_prefix(ids: np.ndarray, ref_ids: np.ndarray, block: int) -> tuple[int, int]:
    """``(common, reused)``: the common token prefix and the part a block cache reuses: whole
    ``block``-token blocks, leaving at least the last prompt token to run (it gives the logits)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    common = common_prefix(ids, ref_ids)
    usable = min(common, int(ids.size) - 1)
    return common, (usable // block) * block


def run_full(eng: SemShareEngine, ids: np.ndarray, ref: Reference, cfg: SemShareConfig, block: int):
    return eng.prefill(ids), {"fetch_ms": 0.0}


@torch.inference_mode()
def run_prefix(eng: SemShareEngine, ids: np.ndarray, ref: Reference, cfg: SemShareConfig, block: int):
    from transformers import DynamicCache

    model, dev, n, L = eng.model, eng.device, int(ids.size), eng.num_layers
    packed, fetch_ms = fetch(ref)
    t0 = time.perf_counter()
    common, p = reusable_prefix(ids, packed.token_ids, block)
    if p == 0:  # not one whole block in common: a plain full prefill
        pre = eng.prefill(ids)
        pre.stats.mapping = {"prefix": 0, "common_prefix": common}
        return pre, {"fetch_ms": fetch_ms}
    cache = DynamicCache(config=model.config)
    if ref.placement == "device":
        kv = ref.on_device[:, :, :, :p]
    else:
        kv = packed.to_torch("cpu")[:, :, :, :p].to(device=dev, dtype=eng.dtype)
    for l in range(L):
        cache.update(kv[l, 0].unsqueeze(0), kv[l, 1].unsqueeze(0), l)
    sync(dev)
    t1 = time.perf_counter()
    rest = torch.from_numpy(ids[p:]).reshape(1, -1).to(dev)
    out = model(input_ids=rest, use_cache=True, logits_to_keep=1, **{cache_kwarg(model.forward): cache})
    logits = out.logits[0, -1].float()
    sync(dev)
    t2 = time.perf_counter()
    stats = PrefillStats(prompt_tokens=n, hit=True, reused_tokens=p, recomputed_tokens=n - p,
                         rows_per_layer=[n - p] * L, retained_per_layer=[n] * L,
                         mapping={"prefix": p, "common_prefix": common}, gather_ms=(t1 - t0) * 1e3,
                         prefill_ms=(t2 - t1) * 1e3)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PrefillResult(ids, logits, cache, keys, values, stats, None, explicit_positions=False), {"fetch_ms": fetch_ms}


def run_semshare(eng: SemShareEngine, ids: np.ndarray, ref: Reference, cfg: SemShareConfig, block: int):
    if ref.placement == "device":
        return eng.prefill(ids, ref.packed, config=cfg, reference_kv=ref.on_device), {"fetch_ms": 0.0}
    packed, fetch_ms = fetch(ref)
    return eng.prefill(ids, packed, config=cfg), {"fetch_ms": fetch_ms}


RUNNERS = {"full": run_full, "prefix": run_prefix, "semshare": run_semshare}


def run_method(eng: SemShareEngine, ids: np.ndarray, ref: Reference, kind: str, cfg: SemShareConfig,
               block: int = DEFAULT_BLOCK):
    """``(PrefillResult, first_token, ttft_ms, timings)``: TTFT = fetch + prefill + first-token sampling.

    ``timings["cpu_ms"]``: CPU time of the calling thread over the same span. With one
    torch thread on a CPU it is the work done, unaffected by other processes taking the
    core (wall time on a shared box is not); meaningless on a GPU.
    """
    sync(eng.device)
    c0, t0 = time.thread_time(), time.perf_counter()
    pre, timings = RUNNERS[kind](eng, ids, ref, cfg, block)
    first = int(torch.argmax(pre.logits))  # greedy sampling of the first token (syncs the device)
    ttft = (time.perf_counter() - t0) * 1e3
    timings["cpu_ms"] = (time.thread_time() - c0) * 1e3
    return pre, first, ttft, timings


def flop_proxy(stats: PrefillStats, n: int, num_layers: int) -> float:
    """Rows computed summed over layers, the hit's extra probe rows included, / (n x layers)."""
    return (sum(stats.rows_per_layer) + int(getattr(stats, "probe_rows", 0) or 0)) / (n * num_layers)


def decode_cache_bytes(cache) -> int:
    """Bytes of K and V the decode cache holds (all layers)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


class HeadInput:
    """Records the last row of what the LM head reads (the final norm's output) on every call.

    The served logits are the bf16 head's output: ~0.125 apart at logit ~30, so two top
    tokens often tie exactly and ``argmax`` breaks the tie by vocabulary index. The same
    hidden state through the head in float32 (:meth:`logits32`) has no such ties: the
    first-token reading that depends on the hidden state, not on the head's rounding.
    """

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        self.weight = head.weight.detach().float()           # [vocab, hidden] float32 copy
        self.last: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        x = args[0]
        self.last = x.reshape(-1, x.shape[-1])[-1].detach().clone()   # [hidden]

    def logits32(self) -> torch.Tensor:
        """float32 ``[vocab]`` logits of the last row the head read."""
        if self.last is None:
            raise RuntimeError("the LM head has not run")
        return self.weight @ self.last.float()

    def close(self) -> None:
        self._handle.remove()


def top2_margin(logits: torch.Tensor) -> float:
    """top-1 minus top-2 of ``[vocab]`` logits (0.0: an exact tie)."""
    v = torch.topk(logits.float().reshape(-1), 2).values
    return float(v[0] - v[1])


def fork(pre: PrefillResult) -> PrefillResult:
    """A copy whose decode cache can be consumed without touching ``pre``'s."""
    return dataclasses.replace(pre, cache=copy.deepcopy(pre.cache))


@torch.inference_mode()
def teacher_force(eng: SemShareEngine, pre: PrefillResult, k: int,
                  target: list[int] | None = None) -> tuple[list[int], list[int], float]:
    """Run ``k`` steps from ``pre`` (consumes its cache): ``(tokens, argmaxes, nll)``.

    At step ``i`` the model's argmax is recorded and ``target[i]`` is fed (``target=None``:
    greedy, the argmax is fed). ``nll`` sums ``-log p(fed token)``. Caches with explicit
    positions (SemShare hits, possibly pruned) step through ``layer_step``; the others
    through ``model.forward``.
    """
    from semshare_core.prefill import layer_step, model_step

    if target is not None and len(target) < k:
        raise ValueError(f"target has {len(target)} tokens, {k} needed")
    logits, pos, nll = pre.logits, int(pre.ids.size), 0.0
    tokens, argmaxes = [], []
    for i in range(k):
        logp = torch.log_softmax(logits.float(), dim=-1)
        a = int(torch.argmax(logp))
        tok = a if target is None else int(target[i])
        argmaxes.append(a)
        tokens.append(tok)
        nll -= float(logp[tok])
        if i + 1 == k:
            break
        if pre.explicit_positions:
            logits = layer_step(eng.model, tok, pos, pre.cache)
        else:
            logits = model_step(eng.model, tok, pre.cache)
        pos += 1
    return tokens, argmaxes, nll


def greedy_answer(eng: SemShareEngine, pre: PrefillResult, max_tokens: int) -> list[int]:
    """Greedy tokens from ``pre`` until EOS (excluded) or ``max_tokens`` (consumes its cache)."""
    toks = list(eng.decode(pre, max_new_tokens=max_tokens, temperature=0.0, stop_on_eos=True))
    return [t for t in toks if t not in eng.eos_ids]
