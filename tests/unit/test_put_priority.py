"""Registration copies can yield the CPU to lookups (issue 16: lookups under write load).

The index actor's put threads and a KV owner's execution thread lower their own priority
(Linux per-thread nice, ``SEMSHARE_INDEX_PUT_NICE``, default 19; 0 turns it off): on a busy
box the event loop's lookups run before a registration's copy."""
from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_index_put_thread_runs_at_a_lower_priority_than_its_loop(monkeypatch):
    from serve_app.index_actor import PUT_NICE_ENV, AsyncKVIndex

    loop_nice = _nice()
    monkeypatch.delenv(PUT_NICE_ENV, raising=False)
    assert asyncio.run(AsyncKVIndex(8, 4, 1 << 20)._in_thread(_nice)) == max(19, loop_nice)  # on by default
    monkeypatch.setenv(PUT_NICE_ENV, "0")
    assert asyncio.run(AsyncKVIndex(8, 4, 1 << 20)._in_thread(_nice)) == loop_nice  # 0: off
    monkeypatch.setenv(PUT_NICE_ENV, "not-a-number")  # a typo keeps the default, it does not break puts
    assert asyncio.run(AsyncKVIndex(8, 4, 1 << 20)._in_thread(_nice)) == max(19, loop_nice)
    assert _nice() == loop_nice  # the caller's own thread is untouched


def test_a_kv_owner_lowers_the_priority_of_the_thread_that_runs_its_puts(monkeypatch):
    from serve_app.index_actor import PUT_NICE_ENV
    from serve_app.kv_owner import _KVOwner

    monkeypatch.setenv(PUT_NICE_ENV, "19")
    seen = {}

    def run():
        before = _nice()
        _KVOwner()
        seen["before"], seen["after"] = before, _nice()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["after"] == max(19, seen["before"]) and seen["after"] > 0
