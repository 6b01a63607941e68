"""`KVOwner`: one actor per node that owns the KV objects registered from that node.

A registration used to hand the prompt's :class:`~semshare_core.PackedKV` to the index
actor, which ``ray.put`` it itself so that the object outlives the replica. That moved
the KV twice: once into the object store as the call's argument, and again by the
actor's own ``ray.put``. When the index actor sat on another node, the first of those
also crossed the network, and the second copy ran in the index actor's process, next
to every lookup.

With ``kv_owner: node`` (``auto`` picks it when the index actor runs on another node) the
replica hands the KV to the ``KVOwner`` on its *own* node (named per node, pinned there
with a hard node affinity). The owner ``ray.put``s it, so the object lives in that
node's store and is owned by a long-lived actor, not by the replica. Only the
``ObjectRef`` goes on to the index actor (``register_ref``): a few hundred bytes, no
copy. Per registration: two copies on the replica's node, none across nodes. A replica
that needs the entry on another node fetches it once, as before.

Lifetime: detached and named (``<index name>-kv-owner-<node id>``), like the index actor,
so it outlives the replicas that use it. It restarts (``max_restarts=-1``) but comes back
empty: the objects it owned are lost (``OwnerDiedError`` on fetch, which the serving path
counts as a lost entry and serves as a miss), exactly as when the index actor restarts.
If its node goes, so do its objects; the index drops such entries when a fetch fails.

``put`` returns ``[ref]``: a ref nested in a list is passed by reference (the caller
becomes a borrower) instead of being dereferenced by Ray on return.
"""
from __future__ import annotations

import logging
from typing import Any

import ray

from semshare_core import PackedKV

from .index_actor import lower_thread_priority

logger = logging.getLogger(__name__)


class _KVOwner:
    """The actor's class (plain, so the put is testable): owns what it ``put``s."""

    def __init__(self):
        lower_thread_priority()  # SEMSHARE_INDEX_PUT_NICE: its copies (this thread runs them) yield the cores

    def put(self, packed: PackedKV) -> list:
        """``[ref]`` to a copy of ``packed`` in this node's object store, owned by this actor."""
        if not isinstance(packed, PackedKV):
            raise TypeError(f"put expects a PackedKV, got {type(packed).__name__}")
        return [ray.put(packed)]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


# num_cpus=0: light, and must never wait for a CPU slot held by a model replica.
# max_concurrency 1: one put at a time (on the 2-core box, 4 concurrent copies made lookups
# slower: benchmarks/results/index-load.md); registrations of a node queue for it.
KVOwner = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1)(_KVOwner)


def owner_name(index_name: str, node_id: str) -> str:
    """The per-node actor name: one owner per (index, node)."""
    return f"{index_name}-kv-owner-{node_id}"


def get_or_create_kv_owner(index_name: str, namespace: str, node_id: str) -> Any:
    """The owner on ``node_id``, created on first use (``get_if_exists``: race-free between
    the replicas of a node). Hard node affinity: it must live where the KV is produced."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return KVOwner.options(name=owner_name(index_name, node_id), namespace=namespace, get_if_exists=True,
                           lifetime="detached",
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


def kill_kv_owners(index_name: str, namespace: str) -> int:
    """Kill every node's owner of ``index_name`` in ``namespace`` (their objects go with
    them: do it with the index actor, e.g. when tearing an app down). Returns how many."""
    prefix = f"{index_name}-kv-owner-"
    n = 0
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == namespace and a["name"].startswith(prefix):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=namespace), no_restart=True)
                n += 1
            except ValueError:  # gone meanwhile
                pass
    return n
