"""Typed application arguments (validated once, at the edge) and model presets.

``build_app(args)`` receives a plain dict (from ``serve_config.yaml`` or the CLI);
:func:`resolve_args` merges the named preset (``serve_app/configs/<preset>.yaml``,
package data read with :mod:`importlib.resources`, so it works from a wheel) under
the given keys and validates the result as :class:`AppArgs`. The validated args
travel to every deployment as a dict (``AppArgs.model_dump()``), so replicas never
read the presets themselves.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from semshare_core import SemShareConfig

if TYPE_CHECKING:
    from semshare_core.scheduler import SchedulerConfig

PRESET_PACKAGE = "serve_app.configs"
PRESET_RE = r"^[A-Za-z0-9_.\-]{1,64}$"
BUILTIN_MODELS = ("smollm2-135m", "tiny-random", "tiny-random-mistral")


class AutoscalingArgs(BaseModel):
    """The model deployment's ``autoscaling_config`` (the keys most people need; Serve's own
    ``AutoscalingConfig`` validates the rest when the deployment is built)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(1, ge=1, le=1024)
    initial_replicas: Optional[int] = Field(None, ge=0, le=1024)
    target_ongoing_requests: float = Field(2.0, gt=0, description="per replica; Serve adds replicas above it")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: Optional[float] = Field(None, gt=0)
    look_back_period_s: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is over max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas
                                                      <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def serve_config(self) -> dict:
        """The dict for ``Deployment.options(autoscaling_config=...)`` (unset keys left out)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AppArgs(BaseModel):
    """Everything the app can be configured with. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    preset: Optional[str] = Field(None, description="a packaged preset (serve_app/configs/<name>.yaml); "
                                  "see list_presets()")
    # model
    model: Optional[Literal["smollm2-135m", "tiny-random", "tiny-random-mistral"]] = None
    model_dir: Optional[str] = Field(None, description="local transformers folder (GPU presets)")
    model_name: Optional[str] = Field(None, description="name served on /v1/models")
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "bfloat16"
    device: str = "cpu"
    torch_threads: Optional[int] = Field(None, ge=1)
    decode_attention: Literal["auto", "native", "sdpa"] = Field(
        "auto", description="decode-step attention: auto = a native kernel for bf16 on CPUs with AVX512-BF16 "
        "(built with the system C compiler at replica start), else SDPA; native = that kernel or fail at start; "
        "sdpa = always SDPA (bf16 decode bit-identical to transformers' generate)")
    compile_decode: Literal["auto", "on", "off"] = Field(
        "auto", description="batched decode steps as one torch.compile (inductor) graph: auto = for bf16 on a CPU "
        "with a C++ compiler (compiled during the replica's warm-up, ~1-2 min the first time on one core), on = "
        "always, off = eager steps (bf16 decode rounding as transformers' generate, with decode_attention=sdpa)")
    huge_pages: bool = Field(True, description="start the model replica's process with THP_MEM_ALLOC_ENABLE=1: "
                             "torch backs its CPU tensors of 2 MB and more with transparent huge pages (fewer page "
                             "faults for fresh KV buffers, fewer TLB misses); it acts only at process start")
    compile_prefill: Literal["auto", "on", "off"] = Field(
        "auto", description="full prefills (and their chunks) as one torch.compile (inductor) graph, and a hit's "
        "decoder layers as one more (shared by every layer): auto = for bf16 on a CPU with a C++ compiler "
        "(compiled during the warm-up), on = always, off = eager (bf16 prefill rounding as transformers' generate)")
    # deployments
    num_replicas: int = Field(1, ge=1, le=1024)
    autoscaling_config: Optional[AutoscalingArgs] = Field(
        None, description="model replicas scale between min_replicas and max_replicas on ongoing requests; "
        "when set, num_replicas is not used")
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    ingress_num_cpus: float = Field(0.1, gt=0)
    ingress_num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(32, ge=1, description="per model replica: requests Serve lets in "
                                      "(running + waiting in the replica's scheduler); >= max_running")
    max_queued_requests: int = Field(64, ge=-1, description="per handle; beyond it requests get 503 + Retry-After")
    warmup: bool = Field(True, description="each model replica, before Serve counts it running (and /ready "
                         "can say 200): a full prefill of a short fixed prompt, two batched decode steps and a "
                         "hit on that prompt's own KV, through its scheduler (serve_app/warmup.py; nothing "
                         "registered, nothing kept hot, scheduler counters reset)")
    # continuous batching (semshare_core/scheduler.py): one engine thread per replica
    max_running: Optional[int] = Field(None, ge=1, le=1024, description="requests prefilling or decoding at "
                                       "once per replica (the decode batch size at most); None: "
                                       "min(16, max_ongoing_requests)")
    max_step_tokens: int = Field(512, ge=1, description="prompt tokens prefilled + tokens decoded per step")
    prefill_chunk: int = Field(512, ge=16, description="a full prefill runs in chunks of this many tokens, "
                               "so running decodes stall by at most about one chunk")
    idle_prefill_tokens: int = Field(2048, ge=0, description="a full prefill of at most this many tokens that "
                                     "starts on an idle replica (nothing running or waiting) runs in one piece: "
                                     "faster than chunks and exactly generate()'s prefill; a request arriving "
                                     "meanwhile waits for it; 0 = always chunk")
    kv_budget_bytes: Optional[int] = Field(None, ge=1, description="KV the admitted requests may reserve per "
                                           "replica; None: 10% of RAM up to 2 GiB on CPU, 30% of the replica's "
                                           "share of accelerator memory")
    stream_interval_ms: float = Field(0.0, ge=0, le=1000, description="after the first token, stream tokens "
                                      "in groups at most this often (0: as they come; tokens that piled up "
                                      "while the client was slow always go as one chunk)")
    ingress_max_ongoing_requests: int = Field(64, ge=1)
    # index
    index_name: str = Field("semshare_index", min_length=1)
    index_namespace: Optional[str] = Field(None, min_length=1, description="None: 'semshare-' + a digest of "
                                           "the model signature, so different models never share an index")
    index_max_items: int = Field(1024, ge=1)
    index_max_bytes: int = Field(1 << 31, ge=1)
    tenant_max_items: Optional[int] = Field(None, ge=1)
    tenant_max_bytes: Optional[int] = Field(None, ge=1)
    lookup_timeout_s: float = Field(2.0, gt=0)
    kv_get_timeout_s: float = Field(10.0, gt=0)
    # reuse path (serve_app/reuse.py, hot_tier.py, affinity_router.py)
    hot_tier_bytes: Optional[int] = Field(None, ge=0, description="replica-local hot KV tier (LRU by bytes); "
                                          "None: 20% of accelerator memory, or 5% of RAM up to 1 GiB on CPU")
    affinity: bool = Field(True, description="route a request to the replica holding its reference hot")
    affinity_imbalance_threshold: int = Field(2, ge=0, description="leave the hot replica when its queue "
                                              "exceeds the least-loaded replica's by more than this")
    register_timeout_s: float = Field(10.0, gt=0, description="registration is awaited before the final event")
    kv_owner: Literal["auto", "node", "index"] = Field("auto", description="who puts a registration's KV "
                                                       "in the object store: node = an owner actor on the "
                                                       "replica's own node (serve_app/kv_owner.py; only the ref "
                                                       "goes to the index, nothing crosses nodes); index = the "
                                                       "index actor (one call fewer); auto = node when the index "
                                                       "actor runs on another node, else index")
    max_reuse_depth: int = Field(2, ge=0, description="entries derived from approximate KV at most this deep")
    depth_cap_policy: Literal["skip", "refresh"] = Field("refresh", description="past max_reuse_depth: register "
                                                         "an exact prefill instead (after decoding), or do not "
                                                         "register (skip: the next variant reuses an older, "
                                                         "more distant entry; lower quality along chains)")
    prefer_exact_margin: float = Field(0.02, ge=0, le=1, description="an exact entry this close in similarity "
                                       "beats an approximate one")
    # method
    sim_threshold: Optional[float] = Field(None, ge=-1.0, le=1.0,
                                           description="default retrieval threshold; None: semshare config's")
    semshare: dict[str, Any] = Field(default_factory=dict, description="SemShareConfig.from_dict")
    # limits
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(1024, ge=1, description="cap on a request's max_new_tokens / max_tokens")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_concurrent_requests: int = Field(64, ge=1, description="generation requests in flight per ingress "
                                         "replica; beyond it 503 + Retry-After")
    request_timeout_s: float = Field(300.0, gt=0, description="a generation running longer ends: 504 JSON, "
                                     "or an SSE error event + [DONE] once streaming")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 answers")
    # HTTP edge (serve_app/http_edge.py): slow / hostile clients
    body_timeout_s: float = Field(10.0, gt=0, le=3600, description="a request body must arrive within this: 408")
    max_receiving_requests: int = Field(256, ge=1, description="requests per ingress replica still sending "
                                        "their body; beyond it 503 + Retry-After")
    max_header_bytes: int = Field(32768, ge=1024, description="total request header size: beyond it 431")
    max_header_count: int = Field(100, ge=8, description="request headers: beyond it 431")
    ready_timeout_s: float = Field(2.0, gt=0, le=60, description="/ready: how long the index actor may take")
    allow_cache_salt: bool = Field(True, description="honour cache_salt (a namespace inside the tenant); "
                                   "False: requests carrying one get 400")
    # observability (serve_app/observability.py)
    log_format: Literal["text", "json"] = Field("text", description="json: Serve's JSON log encoding for every "
                                                "deployment (access lines carry a semshare_access object)")
    access_log: bool = Field(True, description="one log line per generation request (never prompt text)")
    # tenants and keys (see serve_app/auth.py and docs/security.md)
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (prefer the env var "
                                     "or the file: inline keys are visible in the Serve config)")
    api_keys_env: Optional[str] = Field("SEMSHARE_API_KEYS", description="env var holding keys (JSON or "
                                        "key=tenant,...), read on the ingress replica")
    api_keys_file: Optional[str] = Field(None, description="file holding keys (JSON or key=tenant lines)")
    admin_keys: list[str] = Field(default_factory=list, description="keys that may see / clear all tenants")
    admin_keys_env: Optional[str] = Field("SEMSHARE_ADMIN_KEYS", description="env var with admin keys, comma "
                                          "separated")
    admin_tenants: list[str] = Field(default_factory=list, description="tenants whose keys are admin keys")
    trust_tenant_header: bool = Field(True, description="open mode only: accept X-Tenant / X-SemShare-Tenant")
    # fault injection (tests, chaos drills): never set in production
    fault_decode_delay_s: float = Field(0.0, ge=0, le=10, description="the engine sleeps this long after each "
                                        "decode step (a slow replica)")

    @field_validator("semshare")
    @classmethod
    def _semshare_ok(cls, v: dict) -> dict:
        SemShareConfig.from_dict(v)  # raises ValueError/TypeError with the offending knob
        return v

    @model_validator(mode="after")
    def _one_model(self) -> "AppArgs":
        if (self.model is None) == (self.model_dir is None):
            raise ValueError("set exactly one of `model` (built-in) or `model_dir` (local folder)")
        if self.max_running is not None and self.max_ongoing_requests < self.max_running:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_running "
                             f"({self.max_running}): Serve would never let the scheduler fill its batch")
        return self

    def running_limit(self) -> int:
        return self.max_running if self.max_running is not None else min(16, self.max_ongoing_requests)

    def scheduler_config(self, device) -> "SchedulerConfig":
        """The replica's :class:`~semshare_core.scheduler.SchedulerConfig`."""
        from semshare_core.scheduler import SchedulerConfig

        budget = self.kv_budget_bytes if self.kv_budget_bytes is not None else default_kv_budget(device,
                                                                                                 self.num_gpus)
        return SchedulerConfig(max_running=self.running_limit(), max_step_tokens=self.max_step_tokens,
                               prefill_chunk=self.prefill_chunk, idle_prefill_tokens=self.idle_prefill_tokens,
                               kv_budget_bytes=budget,
                               max_waiting=max(1, self.max_ongoing_requests), step_delay_s=self.fault_decode_delay_s)

    def semshare_config(self) -> SemShareConfig:
        cfg = SemShareConfig.from_dict(self.semshare)
        if self.sim_threshold is not None:
            cfg = cfg.with_(sim_threshold=self.sim_threshold)
        return cfg

    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model or Path(self.model_dir).name


def default_kv_budget(device, num_gpus: float = 0.0) -> int:
    """KV bytes one replica's admitted requests may reserve when not configured: on CPU
    10% of RAM up to 2 GiB; on an accelerator 30% of this replica's share of the card
    (``num_gpus`` below 1 is a fraction of it)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        return int(0.3 * total * min(1.0, num_gpus or 1.0))
    try:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(min(2 << 30, 0.1 * ram))


def _preset_dir():
    return resources.files(PRESET_PACKAGE)


def list_presets() -> list[str]:
    return sorted(p.name[:-len(".yaml")] for p in _preset_dir().iterdir()
                  if p.name.endswith(".yaml") and p.is_file())


def load_preset(name: str) -> dict:
    import re

    path = _preset_dir() / f"{name}.yaml"
    if not isinstance(name, str) or not re.match(PRESET_RE, name) or not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {list_presets()}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {name!r} is not a mapping")
    return data


def resolve_args(args: dict | AppArgs | None) -> AppArgs:
    """Preset (if any) overlaid by explicit args, validated. No args: the embedded default."""
    if isinstance(args, AppArgs):
        return args
    args = dict(args or {})
    preset = args.get("preset")
    if preset is None and "model" not in args and "model_dir" not in args:
        preset = "smollm2-135m"
    merged = {**load_preset(preset), **args, "preset": preset} if preset else args
    if "model_dir" in args and "model" not in args:  # an explicit folder beats a preset's built-in model
        merged.pop("model", None)
    return AppArgs(**merged)


def load_model(args: AppArgs):
    """The model + tokenizer the args name (a ``semshare_core.models.LoadedModel``)."""
    from semshare_core import models

    if args.model_dir:
        return models.load_local(args.model_dir, dtype=args.dtype, device=args.device,
                                 name=args.served_model_name())
    if args.model == "smollm2-135m":
        return models.load_smollm2(dtype=args.dtype, device=args.device)
    arch = "mistral" if args.model == "tiny-random-mistral" else "llama"
    lm = models.tiny_random(arch, dtype=args.dtype)
    if args.device != "cpu":
        lm.model.to(args.device)
    return lm
