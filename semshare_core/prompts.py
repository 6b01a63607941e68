"""Prompt text -> token ids, the one way the engine and the serving front-end both use.

Only the tokenizer is needed (the HTTP ingress tokenizes without loading the model).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def encode_text(tokenizer, text: str) -> np.ndarray:
    """int64 ``[n]`` ids of ``text`` with the tokenizer's special tokens (e.g. BOS)."""
    return np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)


def encode_chat(tokenizer, messages: Sequence[dict]) -> np.ndarray:
    """int64 ``[n]`` ids of a chat rendered by the tokenizer's template, generation prompt added."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return np.asarray(ids, dtype=np.int64).reshape(-1)
