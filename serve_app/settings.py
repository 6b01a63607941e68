"""Typed application arguments (validated once, at the edge) and model presets.

``build_app(args)`` receives a plain dict (from ``serve_config.yaml`` or the CLI);
:func:`resolve_args` merges the named preset (``configs/<preset>.yaml``) under the
given keys and validates the result as :class:`AppArgs`. The validated args travel
to every deployment as a dict (``AppArgs.model_dump()``), so replicas never read
the ``configs/`` folder themselves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from semshare_core import SemShareConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BUILTIN_MODELS = ("smollm2-135m", "tiny-random", "tiny-random-mistral")


class AppArgs(BaseModel):
    """Everything the app can be configured with. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    preset: Optional[str] = Field(None, description="name of a file in configs/ (without .yaml)")
    # model
    model: Optional[Literal["smollm2-135m", "tiny-random", "tiny-random-mistral"]] = None
    model_dir: Optional[str] = Field(None, description="local transformers folder (GPU presets)")
    model_name: Optional[str] = Field(None, description="name served on /v1/models")
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "bfloat16"
    device: str = "cpu"
    torch_threads: Optional[int] = Field(None, ge=1)
    # deployments
    num_replicas: int = Field(1, ge=1, le=1024)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    ingress_num_cpus: float = Field(0.1, gt=0)
    ingress_num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(4, ge=1, description="per LLMServer replica")
    max_queued_requests: int = Field(32, ge=-1, description="per handle; beyond it requests get 503")
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
    max_reuse_depth: int = Field(2, ge=0, description="entries derived from approximate KV at most this deep")
    depth_cap_policy: Literal["skip", "refresh"] = Field("skip", description="past max_reuse_depth: do not "
                                                         "register, or register an exact prefill instead")
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
    fault_decode_delay_s: float = Field(0.0, ge=0, le=10, description="sleep between decoded tokens")

    @field_validator("semshare")
    @classmethod
    def _semshare_ok(cls, v: dict) -> dict:
        SemShareConfig.from_dict(v)  # raises ValueError/TypeError with the offending knob
        return v

    @model_validator(mode="after")
    def _one_model(self) -> "AppArgs":
        if (self.model is None) == (self.model_dir is None):
            raise ValueError("set exactly one of `model` (built-in) or `model_dir` (local folder)")
        return self

    def semshare_config(self) -> SemShareConfig:
        cfg = SemShareConfig.from_dict(self.semshare)
        if self.sim_threshold is not None:
            cfg = cfg.with_(sim_threshold=self.sim_threshold)
        return cfg

    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model or Path(self.model_dir).name


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {list_presets()}")
    data = yaml.safe_load(path.read_text()) or {}
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
