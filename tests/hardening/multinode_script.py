"""Run by test_multinode.py in its own process: a 2-node Ray cluster on 127.0.0.1.

Node A (resource ``node_a``) hosts the index actor, which owns every KV object (in A's
object store); node B (``node_b``) hosts a worker actor with the tiny-random engine.
The worker prefills a prompt, registers its KV (the actor on A ray.put()s it), then a
10%-edited variant on B looks it up, pulls the KV from A's object store into B's, and
reuses it. A second prompt is registered as serving does by default, through the KV
owner actor on B (``serve_app/kv_owner.py``): its object is in B's store only, none of
it crossed to A. Prints one JSON line with the facts; exit code 0 when they hold.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


@ray.remote(num_cpus=0.5)
class Worker:
    def __init__(self):
        import torch

        torch.set_num_threads(1)
        from semshare_core import SemShareEngine
        from semshare_core.models import tiny_random

        lm = tiny_random("llama")
        self.engine = SemShareEngine(lm.model, lm.tokenizer)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def register(self, index, text: str, key: str) -> dict:
        ids = self.engine.encode(text)
        pre = self.engine.prefill(ids)
        return ray.get(index.register.remote(key, self.engine.fingerprint(ids), ids,
                                             self.engine.export_kv(pre), "t"))

    def register_owned(self, index, text: str, key: str) -> dict:
        """As a replica registers: the KV to this node's owner actor, the ref to the index."""
        from serve_app.kv_owner import get_or_create_kv_owner

        ids = self.engine.encode(text)
        packed = self.engine.export_kv(self.engine.prefill(ids))
        owner = get_or_create_kv_owner("mn_index", "mn", self.node())
        refs = ray.get(owner.put.remote(packed))
        out = ray.get(index.register_ref.remote(key, self.engine.fingerprint(ids), ids, refs, packed.nbytes,
                                                True, "t"))
        locations = ray.experimental.get_object_locations(refs)[refs[0]]
        return {**out, "owner_node": ray.get(owner.node_id.remote()),
                "object_nodes": sorted(locations.get("node_ids", []))}

    def reuse(self, index, text: str) -> dict:
        ids = self.engine.encode(text)
        hit = ray.get(index.lookup.remote(self.engine.fingerprint(ids), "t", 0.3))
        if hit is None:
            return {"hit": False}
        ref = hit.refs[0]
        t0 = time.perf_counter()
        packed = ray.get(ref, timeout=60)
        fetch_ms = (time.perf_counter() - t0) * 1e3
        locations = ray.experimental.get_object_locations([ref])[ref]
        pre = self.engine.prefill(ids, packed)
        full = self.engine.prefill(ids)
        return {"hit": bool(pre.stats.hit), "key": hit.key, "similarity": hit.similarity,
                "reused_tokens": int(pre.stats.reused_tokens), "prompt_tokens": int(ids.size),
                "kv_bytes": packed.nbytes, "fetch_ms": round(fetch_ms, 2),
                "object_nodes": sorted(locations.get("node_ids", [])),
                "first_token_same": int(pre.logits.argmax()) == int(full.logits.argmax())}


def main() -> int:
    from semshare_core.models import corpus_text

    from serve_app.index_actor import IndexActor

    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="ssmn", dir="/tmp")
    # Cluster.add_node (head) writes the address file ``ray_current_cluster`` into Ray's
    # *default* temp dir ($RAY_TMPDIR/ray, $TMPDIR/ray or /tmp/ray), not into ``temp_dir``:
    # on a fresh machine that directory does not exist yet (FileNotFoundError). Point the
    # default at our own dir (so no shared /tmp/ray/ray_current_cluster is written either)
    # and create the ``ray`` folder it resolves to.
    os.environ["RAY_TMPDIR"] = tmp
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "object_store_memory": 120 << 20,
        "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": tmp})
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=120 << 20,
                         node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        node_of = {r: nid for nid, n in nodes.items() for r in ("node_a", "node_b") if r in n["Resources"]}
        addresses = sorted({n["NodeManagerAddress"] for n in nodes.values()})
        index = IndexActor.options(name="mn_index", resources={"node_a": 0.01}).remote(
            1 << 12, 64, 64 << 20)
        index_node = ray.get(index.ping.remote()) and ray.get(
            ray.remote(num_cpus=0, resources={"node_a": 0.01})(lambda: ray.get_runtime_context().get_node_id())
            .remote())
        worker = Worker.options(resources={"node_b": 0.01}).remote()
        worker_node = ray.get(worker.node.remote())
        corpus = corpus_text()
        base = " ".join(corpus[40000:40900].split())
        words = base.split()
        k = len(words) // 10
        variant = " ".join(words[:len(words) // 2] + ["an", "edited", "stretch"] * (k // 3 + 1)
                           + words[len(words) // 2 + k:])
        reg = ray.get(worker.register.remote(index, base, "t:doc"))
        out = ray.get(worker.reuse.remote(index, variant))
        # through the per-node owner (serving's default): the KV stays in B's store
        other = " ".join(corpus[60000:60900].split())
        owned = ray.get(worker.register_owned.remote(index, other, "t:owned"))
        facts = {"nodes": len(nodes), "addresses": addresses, "index_node": node_of["node_a"][:8],
                 "worker_node": worker_node[:8], "registered": reg["stored"], **out,
                 "object_nodes": [n[:8] for n in out.get("object_nodes", [])],
                 "owned_registered": owned["stored"], "owner_node": owned["owner_node"][:8],
                 "owned_object_nodes": [n[:8] for n in owned["object_nodes"]],
                 "wall_s": round(time.time() - t0, 1)}
        print(json.dumps(facts))
        ok = (len(nodes) == 2 and addresses == ["127.0.0.1"] and worker_node == node_of["node_b"]
              and index_node == node_of["node_a"] and reg["stored"] and out["hit"]
              and out["reused_tokens"] > 0 and node_of["node_a"] in out.get("object_nodes", [])
              and owned["stored"] and owned["owner_node"] == node_of["node_b"]
              and owned["object_nodes"] == [node_of["node_b"]])
        return 0 if ok else 1
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
