"""The ingress's access outcome for a stream the client cuts mid-way: ``cancelled``, not ``error``."""
from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.responses import StreamingResponse

from serve_app.auth import KeyRing, Principal
from serve_app.ingress import Guard


def _guard() -> Guard:
    from serve_app.settings import resolve_args

    return Guard(resolve_args({"preset": "tiny-random"}), KeyRing({}), None)


@pytest.mark.parametrize("spec", ["2.0", "2.4"])
def test_mid_stream_disconnect_is_cancelled(spec, caplog):
    guard = _guard()
    first_sent = asyncio.Event()

    async def tokens():
        yield "data: 1\n\n"
        first_sent.set()
        yield "data: 2\n\n"
        await asyncio.sleep(30)  # the replica would still be decoding
        yield "data: 3\n\n"

    async def app(scope, receive, send):
        await StreamingResponse(tokens(), media_type="text/event-stream")(scope, receive, send)

    sent = []

    async def receive():
        await first_sent.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        if spec == "2.4" and msg["type"] == "http.response.body" and len(sent) >= 2:
            raise OSError("connection reset by peer")  # what a send to a gone client raises
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
             "asgi": {"spec_version": spec}, "state": {}}
    with caplog.at_level(logging.INFO):
        asyncio.run(asyncio.wait_for(guard._observed(app, "/v1/completions", Principal("t"), scope, receive, send), 10))
    assert guard.counters["cancelled"] == 1
    lines = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
    assert lines and "outcome=cancelled" in lines[-1], lines


def test_a_finished_stream_is_not_cancelled(caplog):
    guard = _guard()

    async def app(scope, receive, send):
        scope["state"]["semshare"]["done"] = {"used_semshare": True, "cache_hit": False, "usage": {}}
        await StreamingResponse(iter(["data: 1\n\n"]), media_type="text/event-stream")(scope, receive, send)

    async def receive():
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(msg):
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": {}}
    with caplog.at_level(logging.INFO):
        asyncio.run(guard._observed(app, "/v1/completions", Principal("t"), scope, receive, send))
    assert guard.counters["cancelled"] == 0
    assert "outcome=miss" in [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()][-1]
