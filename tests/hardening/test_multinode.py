"""A two-node Ray cluster on this machine (own process: one Ray per test session holds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_kv_crosses_nodes_through_the_object_store_and_is_reused():
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_script.py"))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    facts = json.loads(lines[-1])
    print("\nmulti-node:", facts)
    assert p.returncode == 0, (facts, p.stderr[-3000:])
    assert facts["nodes"] == 2 and facts["addresses"] == ["127.0.0.1"]
    assert facts["index_node"] != facts["worker_node"]
    assert facts["hit"] and facts["reused_tokens"] > 0
    assert len(facts["object_nodes"]) >= 1
    # serving's default path: the KV owner actor on the registering node; nothing crossed
    assert facts["owned_registered"] and facts["owner_node"] == facts["worker_node"]
    assert facts["owned_object_nodes"] == [facts["worker_node"]]
