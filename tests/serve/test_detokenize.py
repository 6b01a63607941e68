"""serve_app.detokenize: streamed deltas == one full decode, linear work per token."""
from __future__ import annotations

import functools
import json
import random

import pytest

from serve_app.detokenize import IncrementalDetokenizer

MULTIBYTE = [
    "Plain ASCII text, with punctuation: done.",
    "Emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 split across byte tokens.",
    "中文文本：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Mixed: café naïve Ωμέγα — “quotes” … 𝄞 music, 🧪 at the end 😀",
    "  leading spaces and\nnew lines\n\n\ttabs  ",
]


@functools.lru_cache(maxsize=None)
def byte_level():
    from semshare_core.models import train_tiny_tokenizer

    return train_tiny_tokenizer(512)


@functools.lru_cache(maxsize=None)
def byte_fallback():
    """A Llama-2 / Mistral style sentencepiece BPE: '▁' for spaces, <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from semshare_core.models import corpus_text

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = corpus_text()
    tok.train_from_iterator([text[i:i + 4000] for i in range(0, 120_000, 4000)], trainer=trainer)
    # the <0xNN> byte tokens are ordinary vocabulary entries (as in Llama-2 / Mistral), not specials
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


TOKENIZERS = {"byte_level": byte_level, "byte_fallback": byte_fallback}


def stream(tok, ids, **kw) -> tuple[str, list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, **kw)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.flush())
    return "".join(deltas), deltas, d


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize("use_stream", [None, False])
@pytest.mark.parametrize("text", MULTIBYTE)
def test_matches_full_decode(kind, use_stream, text):
    tok = TOKENIZERS[kind]()
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids, skip_special_tokens=True)
    out, deltas, d = stream(tok, ids, use_stream=use_stream)
    assert d.mode == ("window" if use_stream is False or kind == "byte_fallback" else "stream")
    assert out == full
    # no delta ever carries a half character
    assert not any("\ufffd" in x for x in deltas), deltas
    if not text.isascii():
        assert len(ids) > len(text.encode("utf-8")) // 4  # really split into byte-ish pieces


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_multibyte_characters_are_split_across_tokens(kind):
    """The test is only meaningful if a character spans several tokens: check it does, and
    that the stream emits nothing until the character is complete."""
    tok = TOKENIZERS[kind]()
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) >= 2, ids
    d = IncrementalDetokenizer(tok)
    assert [d.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.push(ids[-1]) + d.flush() == "😀"


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_special_tokens_are_skipped_like_decode(kind):
    tok = TOKENIZERS[kind]()
    body = tok.encode("你好 world 😀", add_special_tokens=False)
    specials = [tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens]
    ids = [specials[0]] + body[:3] + [specials[-1]] + body[3:] + [specials[-1]]
    assert stream(tok, ids)[0] == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_random_generations_match(kind):
    """Random token ids (as a sampling model emits them: broken UTF-8 included). The default
    mode per tokenizer (stream for byte-level, window for byte-fallback) and the window."""
    tok = TOKENIZERS[kind]()
    rng = random.Random(7)
    vocab = len(tok)
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        full = tok.decode(ids, skip_special_tokens=True)
        for use_stream in (None, False):
            out = stream(tok, ids, use_stream=use_stream)[0]
            assert out == full, (ids, use_stream)


def test_work_per_token_is_bounded():
    """Linear: the number of ids decoded per push does not grow with the output length."""
    tok = byte_level()
    calls: list[int] = []

    class Counting:
        backend_tokenizer = None  # force the windowed path: its decode calls are observable

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(MULTIBYTE) * 8, add_special_tokens=False)
    assert len(ids) > 1000
    d = IncrementalDetokenizer(Counting())
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert max(calls) <= 16, max(calls)  # a window, never the whole output

    # the streaming path does one full decode, at flush()
    ds = IncrementalDetokenizer(tok)
    assert ds.mode == "stream"
    assert "".join(ds.push(i) for i in ids) + ds.flush() == tok.decode(ids, skip_special_tokens=True)
