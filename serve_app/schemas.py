"""Request / response models of the HTTP API (pydantic v2).

Type mistakes are rejected, not coerced into surprises: strings are ``StrictStr`` and
must be valid Unicode (no lone surrogates); integers are ``StrictInt`` (``"5"``, ``true``
and ``5.0`` are refused); floats accept JSON numbers but not booleans or strings, and
must be finite (NaN / Infinity are refused as such). Numeric ranges are checked here,
the configured caps (``max_new_tokens``, prompt tokens) by the ingress / replica. The
same mistake gets the same 422 error body on every route.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .protocol import KEY_PATTERN, TENANT_PATTERN

MAX_TOKENS_HARD = 1 << 20  # anything above is nonsense whatever the config
MAX_STOP = 16


def _valid_unicode(v: Any) -> Any:
    if not isinstance(v, str):
        return v  # the strict str check refuses it with its own message
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text must be valid Unicode: lone surrogate {v[e.start]!r} at position {e.start}") \
            from None
    return v


Text = Annotated[StrictStr, BeforeValidator(_valid_unicode)]


def _finite(default, **kw):
    return Field(default, allow_inf_nan=False, strict=True, **kw)


CacheSalt = Optional[Annotated[Text, Field(min_length=1, max_length=256)]]
Stop = Optional[Union[Text, Annotated[list[Text], Field(max_length=MAX_STOP)]]]


class _Sampling(BaseModel):
    temperature: float = _finite(0.7, ge=0.0, le=2.0)
    top_p: float = _finite(0.9, gt=0.0, le=1.0)
    seed: Optional[StrictInt] = Field(None, ge=0, le=2**63 - 1)
    use_semshare: StrictBool = True
    sim_threshold: Optional[float] = _finite(None, ge=-1.0, le=1.0)
    # vLLM's per-request cache isolation key: requests share cached KV only with requests
    # of the same tenant AND the same salt (see docs/serving.md)
    cache_salt: CacheSalt = None


class GenerateRequest(_Sampling):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(..., min_length=1)
    max_new_tokens: StrictInt = Field(128, ge=1, le=MAX_TOKENS_HARD)
    store_key: Optional[StrictStr] = Field(None, min_length=1, max_length=128, pattern=KEY_PATTERN)
    stop: Stop = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int = Field(description="prompt tokens whose KV came from the cached reference "
                               "(approximate, semantic reuse; OpenAI routes report it as cached_tokens)")
    recomputed_tokens: int
    mapping: Optional[dict[str, int]] = Field(
        None, description="how the prompt's tokens matched the reference (exact_span / exact_token / fuzzy / "
        "none), when the model replica reports it")
    sources: Optional[list[dict[str, Any]]] = Field(
        None, description="with several cached prompts reused at once: per source its key, tier, similarity, "
        "reused_tokens, exact_tokens (and why it was dropped, if it was)")


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

    model: Optional[Text] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS_HARD)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS_HARD)
    temperature: float = _finite(1.0, ge=0.0, le=2.0)
    top_p: float = _finite(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    user: Optional[Text] = None  # OpenAI's end-user id: accepted, unused, valid Unicode like every string


class CompletionRequest(_OpenAIBase):
    prompt: Union[Text, list[Text]]
    echo: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[Text, list[ContentPart]]

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
    cache_salt: CacheSalt = Field(None, description="clear only this salt's namespace of the tenant")


def error_body(message: str, type_: str = "invalid_request_error", param: Any = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
