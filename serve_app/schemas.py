"""Request / response models of the HTTP API (pydantic v2).

Type mistakes are rejected, not coerced into surprises: strings are ``StrictStr``;
numeric ranges are checked here, the configured caps (``max_new_tokens``, prompt
tokens) by the ingress / replica.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from .protocol import KEY_PATTERN, TENANT_PATTERN

MAX_TOKENS_HARD = 1 << 20  # anything above is nonsense whatever the config


class _Sampling(BaseModel):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    use_semshare: StrictBool = True
    sim_threshold: Optional[float] = Field(None, ge=-1.0, le=1.0)


class GenerateRequest(_Sampling):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(..., min_length=1)
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS_HARD)
    store_key: Optional[StrictStr] = Field(None, min_length=1, max_length=128, pattern=KEY_PATTERN)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int
    recomputed_tokens: int


class Timing(BaseModel):
    ttft_ms: float
    total_ms: float
    lookup_ms: float = 0.0
    kv_fetch_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_check_ms: float = 0.0
    register_wait_ms: float = 0.0


class GenerateResponse(BaseModel):
    text: str
    used_semshare: bool
    cache_hit: bool
    ref_key: Optional[str]
    retrieved_sim: Optional[float]
    store_key: Optional[str]
    replica: str
    finish_reason: str
    fallback: Optional[str] = None
    cache_tier: Optional[str] = None  # "hot" (replica-local) | "cold" (object store) | None
    depth: Optional[int] = None       # derivation depth of the entry named by store_key
    ref_depth: Optional[int] = None
    usage: Usage
    timing: Timing


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _OpenAIBase(_Sampling):
    # OpenAI clients send many optional fields; unknown ones are ignored, not errors.
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_HARD)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_HARD)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    user: Optional[StrictStr] = None


class CompletionRequest(_OpenAIBase):
    prompt: Union[StrictStr, list[StrictStr]]
    echo: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[StrictStr, list[ContentPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(..., min_length=1)


class ClearRequest(BaseModel):
    """Empty / ``{}``: the caller's tenant. ``all_tenants`` or another ``tenant``: admin keys only."""

    model_config = ConfigDict(extra="forbid")
    all_tenants: StrictBool = False
    tenant: Optional[StrictStr] = Field(None, pattern=TENANT_PATTERN)


def error_body(message: str, type_: str = "invalid_request_error", param: Any = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
