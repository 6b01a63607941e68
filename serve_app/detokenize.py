"""Incremental detokenization, linear in the output length.

:class:`IncrementalDetokenizer` has the interface of ``llm_server.TextStream``
(``push(token_id) -> str`` delta, ``flush() -> str`` rest) but never re-decodes the
whole output: it uses ``tokenizers``' streaming decoder
(:class:`tokenizers.decoders.DecodeStream`, which keeps a small window of the last
tokens and emits text once the bytes form valid UTF-8), and otherwise (slow
tokenizers, or a decoder error) a windowed decode over the last emitted tokens only
(the offsets scheme vLLM uses). Either way the concatenated deltas equal a full
``tokenizer.decode(ids, skip_special_tokens=True)`` for byte-level BPE (GPT-2, Llama-3,
SmolLM2) and byte-fallback (Llama-2 / Mistral sentencepiece) tokenizers, including
characters split across tokens (emoji, CJK).

Byte-fallback decoders (``<0xNN>`` tokens) take the windowed path: on *invalid* UTF-8
(random bytes a sampler can emit) ``DecodeStream`` can emit text that a full decode
renders differently (it raises "Invalid prefix" a few tokens later, after the
divergent text is out). The full decode is not even causal there: a run of byte tokens
is decoded as a group, and an invalid group turns *every* byte of it into U+FFFD, an
ASCII ``<0x49>`` included. The windowed path therefore holds a run of byte tokens back
until a non-byte token ends it, and so reproduces the full decode exactly.

Wiring in ``LLMServer``: ``text = IncrementalDetokenizer(self.engine.tokenizer)`` in place
of ``text = TextStream(self.engine)``.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)

try:  # tokenizers >= 0.21
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    _RustTokenizer = None
    _DecodeStream = None

REPLACEMENT = "\ufffd"


def backend_of(tokenizer: Any):
    """The Rust ``tokenizers.Tokenizer`` behind ``tokenizer`` (an HF fast tokenizer or the
    Rust object itself), or None."""
    if _RustTokenizer is None:
        return None
    if isinstance(tokenizer, _RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, _RustTokenizer) else None


def _has_byte_fallback(backend) -> bool:
    try:
        return bool(getattr(backend.model, "byte_fallback", False)) or "ByteFallback" in repr(backend.decoder)
    except Exception:  # noqa: BLE001
        return True


def _cleans_up_spaces(tokenizer: Any) -> bool:
    # HF's decode() may post-process (" ." -> "."); the streaming decoder does not, so
    # such tokenizers take the windowed path, which goes through decode() itself
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids (see the module docstring)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, use_stream: Optional[bool] = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.backend = backend_of(tokenizer)
        if use_stream is None:
            use_stream = (self.backend is not None and _DecodeStream is not None and not _cleans_up_spaces(tokenizer)
                          and not _has_byte_fallback(self.backend))
        self._stream = _DecodeStream(skip_special_tokens=skip_special_tokens) if use_stream else None
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        # windowed path: ids[prefix:read] were decoded and emitted, ids[read:] are pending
        self._prefix = self._read = 0
        self._byte_ids: frozenset = frozenset()
        if self.backend is not None and _has_byte_fallback(self.backend):
            ids = (self.backend.token_to_id(f"<0x{i:02X}>") for i in range(256))
            self._byte_ids = frozenset(i for i in ids if i is not None)

    @property
    def mode(self) -> str:
        return "stream" if self._stream is not None else "window"

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, tok: int) -> str:
        self.ids.append(int(tok))
        if self._stream is not None:
            try:
                delta = self._stream.step(self.backend, int(tok))
            except Exception as e:  # noqa: BLE001 - e.g. an id the decoder cannot handle
                logger.warning("streaming decoder failed (%s: %s): windowed decoding", type(e).__name__, e)
                return self._switch_to_window()
            delta = delta or ""
            self.text += delta
            return delta
        return self._window_step(final=False)

    def flush(self) -> str:
        if self._stream is not None:
            # the stream holds back only bytes that are not valid UTF-8 yet; one full decode at
            # the end (linear) says what the batch decoder makes of them (usually U+FFFD)
            rest = self._decode(self.ids)
            delta = rest[len(self.text):] if rest.startswith(self.text) else ""
            self.text += delta
            return delta
        return self._window_step(final=True)

    # windowed decoding -----------------------------------------------------------------
    def _window_step(self, final: bool) -> str:
        if not final and self.ids and self.ids[-1] in self._byte_ids:
            return ""  # a byte run renders only once it is complete (see the module docstring)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT)) \
                and new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def _switch_to_window(self) -> str:
        """Continue without the stream: re-sync on what was emitted, then window from here."""
        self._stream = None
        full = self._decode(self.ids)
        delta = full[len(self.text):] if (full.startswith(self.text) and not full.endswith(REPLACEMENT)) else ""
        self.text += delta
        if delta or not self.ids[:-1]:
            self._prefix = max(0, len(self.ids) - 1)
            self._read = len(self.ids)
        else:
            self._prefix = max(0, len(self.ids) - 2)
            self._read = len(self.ids) - 1
        return delta
