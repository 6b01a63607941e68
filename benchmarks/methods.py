"""The prefill strategies compared by the benchmark, one function per method.

Every function takes the engine, the target ids and a :class:`Reference` (the stored
reference prompt: packed KV as bytes, as host numpy, or already on the device) and
returns ``(PrefillResult, timings)`` where ``timings`` holds ``fetch_ms`` (getting the
reference KV into a usable form) and the stage times. The caller times the whole call
plus sampling the first token: that is the TTFT.

* ``full``: :meth:`SemShareEngine.prefill` without a reference (exactly ``generate``).
* ``prefix``: exact-prefix reuse, what vLLM / SGLang prefix caching gets: the KV rows
  ``[0, p)`` of the longest common token prefix are put in a ``DynamicCache`` and the
  rest of the prompt runs through ``model.forward`` on top of it.
* ``semshare*``: :meth:`SemShareEngine.prefill` with the reference (selective recompute);
  with ``placement == "device"`` the same steps are run here with the gather on the
  device (``map_to_reference`` -> ``index_select`` + ``rerotate_keys`` ->
  ``selective_prefill`` -> pruning), because the engine always gathers on the host.

Only submodules of ``semshare_core`` are imported (no faiss; the GPU image lacks it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from semshare_core.config import SemShareConfig
from semshare_core.engine import PrefillResult, PrefillStats, SemShareEngine
from semshare_core.kv import PackedKV
from semshare_core.prefill import cache_kwarg

PLACEMENTS = ("bytes", "host", "device")


@dataclass(frozen=True)
class MethodSpec:
    """A benchmarked strategy: ``kind`` is ``full``, ``prefix`` or ``semshare``."""

    name: str
    kind: str
    recompute_ratio: float | None = None
    retention: float | None = None


def method_specs(base: SemShareConfig, pruned_retention: float = 0.5,
                 extra_retentions: tuple[float, ...] = ()) -> dict[str, MethodSpec]:
    specs = {
        "full": MethodSpec("full", "full"),
        "prefix": MethodSpec("prefix", "prefix"),
        "semshare_r0": MethodSpec("semshare_r0", "semshare", 0.0, base.retention),
        "semshare": MethodSpec("semshare", "semshare", base.recompute_ratio, base.retention),
        "semshare_pruned": MethodSpec("semshare_pruned", "semshare", base.recompute_ratio, pruned_retention),
        "semshare_r1": MethodSpec("semshare_r1", "semshare", 1.0, base.retention),
    }
    for r in extra_retentions:
        name = f"semshare_ret{r:g}"
        specs[name] = MethodSpec(name, "semshare", base.recompute_ratio, r)
    return specs


@dataclass
class Reference:
    """A stored reference prompt. ``blob``: wire bytes (placement ``bytes``);
    ``packed``: host numpy (placement ``host``, and always for the token ids);
    ``on_device``: ``[L, 2, H, m, D]`` tensor already on the accelerator (``device``)."""

    ids: np.ndarray
    packed: PackedKV
    blob: bytes | None = None
    on_device: torch.Tensor | None = None
    placement: str = "bytes"
    full_stats: dict = field(default_factory=dict)

    @property
    def kv_bytes(self) -> int:
        return self.packed.nbytes


def make_reference(eng: SemShareEngine, ids: np.ndarray, placement: str) -> Reference:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    pre = eng.prefill(ids)
    packed = eng.export_kv(pre)
    ref = Reference(ids=ids, packed=packed, placement=placement, full_stats=pre.stats.to_dict())
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


def run_full(eng: SemShareEngine, ids: np.ndarray, ref: Reference, spec: MethodSpec):
    pre = eng.prefill(ids)
    return pre, {"fetch_ms": 0.0}


@torch.inference_mode()
def run_prefix(eng: SemShareEngine, ids: np.ndarray, ref: Reference, spec: MethodSpec):
    from transformers import DynamicCache

    model, dev, n, L = eng.model, eng.device, int(ids.size), eng.num_layers
    packed, fetch_ms = fetch(ref)
    t0 = time.perf_counter()
    p = min(common_prefix(ids, packed.token_ids), n - 1)  # the last token must run: it gives the logits
    cache = DynamicCache(config=model.config)
    if p > 0:
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
    stats = PrefillStats(prompt_tokens=n, hit=p > 0, reused_tokens=p, recomputed_tokens=n - p,
                         rows_per_layer=[n - p] * L, retained_per_layer=[n] * L,
                         mapping={"prefix": p}, gather_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3)
    pre = PrefillResult(ids, logits, cache, [], [], stats, None, explicit_positions=False)
    return pre, {"fetch_ms": fetch_ms}


def run_semshare(eng: SemShareEngine, ids: np.ndarray, ref: Reference, spec: MethodSpec):
    cfg = eng.config.with_(recompute_ratio=spec.recompute_ratio, retention=spec.retention)
    if ref.placement == "device":
        return semshare_on_device(eng, ids, ref, cfg), {"fetch_ms": 0.0}
    packed, fetch_ms = fetch(ref)
    return eng.prefill(ids, packed, config=cfg), {"fetch_ms": fetch_ms}


def semshare_on_device(eng: SemShareEngine, ids: np.ndarray, ref: Reference, cfg: SemShareConfig) -> PrefillResult:
    """The engine's hit path with the reference KV already on the device (gather there)."""
    return eng.prefill(ids, ref.packed, config=cfg, reference_kv=ref.on_device)


RUNNERS = {"full": run_full, "prefix": run_prefix, "semshare": run_semshare}


def run_method(eng: SemShareEngine, ids: np.ndarray, ref: Reference, spec: MethodSpec):
    """``(PrefillResult, first_token, ttft_ms, timings)``: TTFT = fetch + prefill + first-token sampling."""
    sync(eng.device)
    t0 = time.perf_counter()
    pre, timings = RUNNERS[spec.kind](eng, ids, ref, spec)
    first = int(torch.argmax(pre.logits))  # greedy sampling of the first token (syncs the device)
    ttft = (time.perf_counter() - t0) * 1e3
    return pre, first, ttft, timings


def decode_cache_bytes(cache) -> int:
    """Bytes of K and V the decode cache holds (all layers)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def teacher_forced_nll(eng: SemShareEngine, pre: PrefillResult, tokens: list[int]) -> tuple[float, int]:
    """Summed NLL of ``tokens`` continued from ``pre`` (consumes its cache)."""
    from semshare_core.prefill import layer_step, model_step

    logits, pos, nll = pre.logits, int(pre.ids.size), 0.0
    for i, tok in enumerate(tokens):
        nll -= float(torch.log_softmax(logits.float(), dim=-1)[tok])
        if i + 1 == len(tokens):
            break
        if pre.explicit_positions:
            logits = layer_step(eng.model, tok, pos, pre.cache)
        else:
            logits = model_step(eng.model, tok, pre.cache)
        pos += 1
    return nll, len(tokens)
