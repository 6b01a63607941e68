"""A streaming OpenAI ``/v1/completions`` client and the client-side timing it records.

The same client runs against our server and any OpenAI-compatible peer (vLLM): it posts
``stream: true`` with ``stream_options: {include_usage: true}`` and reads the SSE events.

Per request: TTFT (request sent -> first chunk with non-empty text), the arrival time of
every non-empty text chunk, total latency, completion tokens (``usage``; the chunk count
when a server sends no usage), cached prompt tokens (``usage.prompt_tokens_details.
cached_tokens``) and our server's ``semshare`` object (``cache_hit``...), found on its
final chunk.

Inter-token latency: a chunk may carry several tokens (our server skips tokens whose
text is empty and sends their text with the next one), so the ``n_tokens`` tokens are
spread evenly over the ``k`` chunks: each gap between successive chunks gives one ITL
sample, ``gap / (n_tokens / k)`` (the gap per token). With one token per chunk that is
the plain gap.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import httpx


def parse_sse_line(line: str) -> Optional[Any]:
    """The JSON of one ``data:`` line; ``"[DONE]"`` for the end marker; None otherwise."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return "[DONE]"
    if not data:
        return None
    return json.loads(data)


def itl_samples(chunk_times: list[float], n_tokens: Optional[int]) -> list[float]:
    """ITL samples (same unit as ``chunk_times``) from the arrival times of the text chunks."""
    k = len(chunk_times)
    if k < 2:
        return []
    per_chunk = max(1.0, (n_tokens if n_tokens else k) / k)
    return [(b - a) / per_chunk for a, b in zip(chunk_times, chunk_times[1:])]


class StreamRecorder:
    """Folds a completion stream's events into one record (times in ms from ``t0``)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.chunk_ms: list[float] = []
        self.usage: Optional[dict] = None
        self.semshare: Optional[dict] = None
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.done = False
        self.text_parts: list[str] = []

    def feed(self, event: Any, now: float) -> None:
        if event is None:
            return
        if event == "[DONE]":
            self.done = True
            return
        if "error" in event and not event.get("choices"):
            err = event["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        for ch in event.get("choices") or []:
            text = ch.get("text")
            if text is None:  # chat-style chunk
                text = (ch.get("delta") or {}).get("content")
            if text:
                self.chunk_ms.append((now - self.t0) * 1e3)
                self.text_parts.append(text)
            if ch.get("finish_reason"):
                self.finish_reason = ch["finish_reason"]
        if event.get("usage"):
            self.usage = event["usage"]
        if event.get("semshare"):
            self.semshare = event["semshare"]

    def record(self, status: int, end: float) -> dict:
        u = self.usage or {}
        n_tokens = u.get("completion_tokens")
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        rec = {"status": status, "latency_ms": (end - self.t0) * 1e3,
               "ttft_ms": self.chunk_ms[0] if self.chunk_ms else None,
               "chunks": len(self.chunk_ms),
               "completion_tokens": n_tokens if n_tokens is not None else len(self.chunk_ms),
               "usage_reported": self.usage is not None,
               "prompt_tokens": u.get("prompt_tokens"), "cached_tokens": cached,
               "itl_ms": [round(x, 3) for x in itl_samples(self.chunk_ms, n_tokens)],
               "finish_reason": self.finish_reason, "done_marker": self.done}
        if self.semshare is not None:
            rec["semshare"] = self.semshare
            rec["cache_hit"] = bool(self.semshare.get("cache_hit"))
        elif cached is not None:
            rec["cache_hit"] = cached > 0
        if self.error is not None:
            rec["error"] = self.error
        return rec


def completion_body(model: str, prompt: str, max_tokens: int, cache_salt: Optional[str] = None,
                    ignore_eos: bool = False) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if cache_salt:
        body["cache_salt"] = cache_salt
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict,
                            headers: Optional[dict] = None) -> dict:
    """POST ``url``/v1/completions (streaming) and return the request's record.

    A status other than 200, a transport error or an in-band error event makes the record's
    ``status`` non-200 (0 for a transport error, 599 for an in-band stream error)."""
    t0 = time.perf_counter()
    rec = StreamRecorder(t0)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers or {}) as r:
            if r.status_code != 200:
                raw = (await r.aread()).decode("utf-8", "replace")
                out = rec.record(r.status_code, time.perf_counter())
                out["error"] = raw[:300]
                return out
            async for line in r.aiter_lines():
                rec.feed(parse_sse_line(line), time.perf_counter())
            status = 200
    except httpx.HTTPError as e:
        out = rec.record(0, time.perf_counter())
        out["error"] = repr(e)[:300]
        return out
    out = rec.record(status, time.perf_counter())
    if "error" in out:
        out["status"] = 599
    return out


async def served_model(client: httpx.AsyncClient, url: str) -> str:
    """The first model id GET /v1/models lists."""
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return data[0]["id"]
