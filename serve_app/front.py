"""The ingress side of reuse: tokenize, fingerprint and look up once, before routing.

:class:`Front` turns a validated HTTP payload into a :class:`~serve_app.protocol.ReplicaRequest`
carrying the prompt's token ids, its retrieval vector and the index's answer (which
entry to reuse, which replicas hold it hot). The request router reads the answer to
pick a replica (:mod:`serve_app.affinity_router`); the replica uses it as is.

The ingress needs only the tokenizer (never the model). When it cannot load one (e.g.
a model folder that exists only on GPU nodes), requests go out untokenized and the
replica does the work itself: slower routing, same answers.

:class:`PromptCodec` must tokenize exactly as ``SemShareEngine.encode`` /
``encode_chat`` and fingerprint as ``SemShareEngine.fingerprint`` (a unit test holds
them together); a digest of the tokenizer travels with each request and the replica
refuses ids cut by another tokenizer.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Optional, Sequence

import numpy as np

from semshare_core import SemShareConfig
from semshare_core.fingerprint import prompt_vector
from semshare_core.prompts import encode_chat, encode_text

from .protocol import ClientError, Reference, ReplicaRequest, Sampling
from .reuse import IndexClient, index_namespace
from .settings import AppArgs

logger = logging.getLogger("ray.serve")


def tokenizer_digest(tok) -> str:
    """Identity of a tokenizer: vocabulary, specials and chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), separators=(",", ":")).encode())
    h.update(json.dumps([str(getattr(tok, "chat_template", None)), str(tok.all_special_tokens)]).encode())
    return h.hexdigest()[:16]


def load_tokenizer(args: AppArgs):
    """The served model's tokenizer alone (no weights)."""
    from semshare_core import models

    if args.model_dir:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    if args.model == "smollm2-135m":
        from transformers import AutoTokenizer

        dest = models.default_cache_dir() / models.SMOLLM2_CACHE_NAME
        if (dest / "config.json").is_file():
            return AutoTokenizer.from_pretrained(dest, local_files_only=True)
        gguf = models.smollm2_gguf_path()  # not converted yet: the GGUF holds the tokenizer too
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return models.train_tiny_tokenizer(512)


class PromptCodec:
    """Tokenizer + retrieval vector, as the engine computes them."""

    def __init__(self, tokenizer, config: SemShareConfig):
        self.tokenizer, self.config = tokenizer, config
        self.digest = tokenizer_digest(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return encode_text(self.tokenizer, text)

    def encode_chat(self, messages: Sequence[dict]) -> np.ndarray:
        return encode_chat(self.tokenizer, messages)

    def fingerprint(self, ids: np.ndarray) -> np.ndarray:
        return prompt_vector(ids, self.config.ngram, self.config.fingerprint_dim)

    def tokenize(self, prompt: Optional[str], messages: Optional[list[dict]], max_prompt_tokens: int) -> np.ndarray:
        if messages is not None:
            try:
                ids = self.encode_chat(messages)
            except Exception as e:  # noqa: BLE001 - a template error is the client's messages
                raise ClientError(f"could not apply the chat template: {e}") from e
        else:
            if not isinstance(prompt, str):
                raise ClientError("prompt must be a string")
            ids = self.encode(prompt)
        if ids.size == 0:
            raise ClientError("prompt is empty (no tokens)")
        if ids.size > max_prompt_tokens:
            raise ClientError(f"prompt has {ids.size} tokens; this server accepts at most {max_prompt_tokens}",
                              error_type="context_length_exceeded")
        return ids


def sampling_from(payload: dict) -> Sampling:
    """The payload the routes build always names every sampling field."""
    stop = payload.get("stop") or []
    return Sampling(int(payload["max_new_tokens"]), float(payload["temperature"]), float(payload["top_p"]),
                    payload.get("seed"), tuple(s for s in stop if isinstance(s, str)),
                    bool(payload.get("stop_on_eos", True))).normalized()


class Front:
    """Per ingress replica: prepares every generation request (see module docstring)."""

    def __init__(self, args: AppArgs, signature_fn=None):
        """``signature_fn``: async, the model signature digest (asked of a replica) when the
        index namespace is the per-model default."""
        self.args = args
        self.config = args.semshare_config()

        async def namespace() -> str:
            return index_namespace(args, await signature_fn())

        ns = args.index_namespace if (args.index_namespace or signature_fn is None) else namespace
        self.index = IndexClient(args, self.config.fingerprint_dim, ns or "semshare")
        self._codec: Optional[PromptCodec] = None
        self._codec_failed = False
        self.counters = {"prepared": 0, "untokenized": 0, "lookups": 0, "lookup_hits": 0, "hot_known": 0}

    async def codec(self) -> Optional[PromptCodec]:
        if self._codec is None and not self._codec_failed:
            try:
                tok = await asyncio.to_thread(load_tokenizer, self.args)
                self._codec = PromptCodec(tok, self.config)
            except Exception as e:  # noqa: BLE001 - the replicas can tokenize themselves
                self._codec_failed = True
                logger.warning("ingress has no tokenizer (%s: %s): replicas tokenize and look up", type(e).__name__, e)
        return self._codec

    async def prepare(self, payload: dict) -> ReplicaRequest:
        """Raises :class:`ClientError` (prompt too long, empty, bad chat template)."""
        t0 = time.perf_counter()
        use = bool(payload.get("use_semshare", True))
        req = ReplicaRequest(tenant=payload.get("tenant") or "default", sampling=sampling_from(payload),
                             use_semshare=use, sim_threshold=payload.get("sim_threshold"),
                             store_key=payload.get("store_key"), stream=bool(payload.get("stream", True)))
        codec = await self.codec()
        self.counters["prepared"] += 1
        if codec is None:
            self.counters["untokenized"] += 1
            req.prompt, req.messages = payload.get("prompt"), payload.get("messages")
            return req

        def work():
            ids = codec.tokenize(payload.get("prompt"), payload.get("messages"), self.args.max_prompt_tokens)
            return ids, (codec.fingerprint(ids) if use else None)

        req.ids, req.vector = await asyncio.to_thread(work)
        req.tokenizer_digest = codec.digest
        req.prepare_ms = (time.perf_counter() - t0) * 1e3
        if use:
            threshold = req.sim_threshold if req.sim_threshold is not None else self.config.sim_threshold
            ts = time.perf_counter()
            ref, fallback, more = await self.index.lookup(req.vector, req.tenant, float(threshold), req.ids,
                                                          self.config.max_sources)
            req.lookup_ms = (time.perf_counter() - ts) * 1e3
            req.looked_up, req.reference, req.lookup_fallback, req.more_sources = True, ref, fallback, more
            req.index_namespace = self.index.known_namespace
            self.counters["lookups"] += 1
            if ref is not None:
                self.counters["lookup_hits"] += 1
                self.counters["hot_known"] += bool(ref.hot)
        return req


__all__ = ["Front", "PromptCodec", "Reference", "load_tokenizer", "tokenizer_digest"]
