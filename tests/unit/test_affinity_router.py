"""The cache-affinity router's choice, on fake replicas (no Ray cluster needed)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest


@dataclass(frozen=True)
class FakeID:
    unique_id: str


@dataclass(eq=False)
class FakeReplica:
    name: str
    max_ongoing_requests: int = 4
    replica_id: FakeID = field(init=False)

    def __post_init__(self):
        self.replica_id = FakeID(self.name)


def make_router(queues: dict[str, int], threshold: int = 1):
    from serve_app.affinity_router import CacheAffinityRouter

    r = object.__new__(CacheAffinityRouter)
    r._use_replica_queue_len_cache = True
    r._replica_queue_len_cache = SimpleNamespace(get=lambda rid: queues.get(rid.unique_id))

    async def probe(replicas, backoff):  # replicas missing from the cache: unknown
        return [(x, None) for x in replicas]
    r._probe_queue_lens = probe
    r.initialize_state(imbalanced_threshold=threshold)
    return r


def request(hot: list[str]):
    return SimpleNamespace(args=[SimpleNamespace(hot_replicas=hot)], metadata=SimpleNamespace(multiplexed_model_id=""))


def choose(router, replicas, hot):
    return asyncio.run(router.choose_replicas(replicas, request(hot)))


def names(ranks):
    return [[r.name for r in rank] for rank in ranks]


def test_prefers_the_hot_holder_while_balanced():
    reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    r = make_router({"a": 1, "b": 0, "c": 0}, threshold=1)
    assert names(choose(r, reps, ["a"])) == [["a"], ["b", "c"]]
    assert r.affinity_counters["hot_routed"] == 1


def test_backs_off_when_the_holder_queue_exceeds_the_least_loaded_by_more_than_the_threshold():
    reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    r = make_router({"a": 3, "b": 1, "c": 2}, threshold=1)
    ranks = names(choose(r, reps, ["a"]))
    assert ranks[0] == ["b", "c"] and ranks[-1] == ["a"]  # elsewhere first (least loaded picked by Serve)
    assert r.affinity_counters["hot_backoff"] == 1
    r = make_router({"a": 2, "b": 1, "c": 2}, threshold=1)  # exactly at the threshold: still the holder
    assert names(choose(r, reps, ["a"]))[0] == ["a"]


def test_full_or_unknown_holder_is_left_and_dead_holders_ignored(monkeypatch):
    reps = [FakeReplica("a", max_ongoing_requests=2), FakeReplica("b")]
    r = make_router({"a": 2, "b": 2}, threshold=5)
    assert names(choose(r, reps, ["a"]))[0] == ["b"]  # a is full
    r = make_router({"b": 0}, threshold=5)
    assert names(choose(r, reps, ["a"]))[0] == ["b"]  # a's queue unknown (probe failed)
    from serve_app import affinity_router

    called = []

    async def pow2(self, candidate_replicas, pending_request=None):
        called.append(pending_request)
        return [candidate_replicas[:1]]
    monkeypatch.setattr(affinity_router.CacheAffinityRouter, "two_choices", pow2)
    r = make_router({"a": 0, "b": 0})
    assert names(choose(r, reps, ["gone"])) == [["a"]] and len(called) == 1  # holder not among replicas
    assert r.affinity_counters["hot_unavailable"] == 1
    assert names(choose(r, reps, [])) == [["a"]] and r.affinity_counters["no_hot"] == 1
    r.initialize_state(affinity=False)
    assert names(choose(r, reps, ["a"])) == [["a"]] and len(called) == 3


def test_a_holder_slow_to_answer_the_first_probe_is_asked_again():
    """A busy box: the holder misses the first probe's deadline but answers the next
    (longer) one; it keeps the request. Three misses: it is left."""
    reps = [FakeReplica("a"), FakeReplica("b")]
    r = make_router({"b": 0}, threshold=1)
    asked = []

    async def probe(replicas, backoff):
        asked.append((backoff, [x.name for x in replicas]))
        return [(x, 0 if backoff >= 1 else None) for x in replicas]
    r._probe_queue_lens = probe
    assert names(choose(r, reps, ["a"]))[0] == ["a"]
    assert asked == [(0, ["a"]), (1, ["a"])]

    async def never(replicas, backoff):
        asked.append(backoff)
        return [(x, None) for x in replicas]
    r._probe_queue_lens = never
    asked.clear()
    assert names(choose(r, reps, ["a"]))[0] == ["b"] and asked == [0, 1, 2]


def test_two_holders_least_loaded_first():
    reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    r = make_router({"a": 2, "b": 1, "c": 1}, threshold=1)
    assert names(choose(r, reps, ["a", "b"])) == [["b", "a"], ["c"]]


@pytest.mark.parametrize("args", [[], [object()], [SimpleNamespace(hot_replicas="a")]])
def test_requests_without_hot_info(args):
    from serve_app.affinity_router import hot_replicas_of

    assert hot_replicas_of(SimpleNamespace(args=args)) == []
    assert hot_replicas_of(None) == []


# replicas leaving: the router tells the index ------------------------------------------------


class FakeIndex:
    def __init__(self, fail: int = 0):
        self.calls: list[list[str]] = []
        self.fail = fail
        self.drop_holders = SimpleNamespace(remote=self._remote)

    def _remote(self, ids):
        async def call():
            if self.fail:
                self.fail -= 1
                raise RuntimeError("index unreachable")
            self.calls.append(sorted(ids))
            return len(ids)
        return call()


@pytest.fixture
def serve_hooks(monkeypatch):
    """Ray's own update_replicas / on_replica_actor_died, reduced to the replica set they keep."""
    from ray.serve._private.request_router.request_router import RequestRouter

    def update(self, replicas):
        self._replicas = {r.replica_id: r for r in replicas}

    def died(self, replica_id):
        self._replicas.pop(replica_id, None)
    monkeypatch.setattr(RequestRouter, "update_replicas", update)
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", died)


def leaving_router(index, namespace="ns"):
    r = make_router({})
    r._replicas = {}
    r.initialize_state(imbalanced_threshold=1, index_name="idx", index_namespace=namespace)
    r._index_handle = index
    return r


def test_replicas_leaving_the_set_or_dying_are_reported_to_the_index(serve_hooks):
    index = FakeIndex()
    r = leaving_router(index)
    a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")

    async def run():
        r.update_replicas([a, b, c])
        await asyncio.sleep(0)
        assert index.calls == []                      # nothing left
        r.update_replicas([a, c])                     # b left (controller update)
        await r._report_task
        r.on_replica_actor_died(c.replica_id)         # c found dead while routing
        await r._report_task
        r.update_replicas([a, FakeReplica("d")])      # c already reported: not again
        await asyncio.sleep(0)
    asyncio.run(run())
    assert index.calls == [["b"], ["c"]]
    assert r.affinity_counters["replicas_gone"] == 2 and r.affinity_counters["gone_reported"] == 2
    assert r._gone_pending == {}


def test_a_failed_report_never_raises_and_is_retried(serve_hooks, monkeypatch):
    from serve_app import affinity_router

    async def pow2(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]
    monkeypatch.setattr(affinity_router.CacheAffinityRouter, "two_choices", pow2)
    index = FakeIndex(fail=1)
    r = leaving_router(index)
    a, b = FakeReplica("a"), FakeReplica("b")

    async def run():
        r.update_replicas([a, b])
        r.update_replicas([a])
        await r._report_task                          # fails: kept pending, no exception
        assert r.affinity_counters["gone_report_errors"] == 1 and list(r._gone_pending) == ["b"]
        r._index_handle = index                       # (the failure dropped the handle)
        r._report_retry_at = 0
        await r.choose_replicas([a], request([]))     # a later request retries
        await r._report_task
    asyncio.run(run())
    assert index.calls == [["b"]] and r._gone_pending == {}


def test_the_namespace_is_learned_from_a_request_before_reporting(serve_hooks, monkeypatch):
    from serve_app import affinity_router

    async def pow2(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]
    monkeypatch.setattr(affinity_router.CacheAffinityRouter, "two_choices", pow2)
    index = FakeIndex()
    r = leaving_router(index, namespace=None)
    a, b = FakeReplica("a"), FakeReplica("b")

    async def run():
        r.update_replicas([a, b])
        r.update_replicas([a])
        await asyncio.sleep(0)
        assert r._report_task is None and list(r._gone_pending) == ["b"]  # nowhere to report yet
        req = request([])
        req.args[0].index_namespace = "semshare-abc"
        await r.choose_replicas([a], req)
        await r._report_task
    asyncio.run(run())
    assert r._index_namespace == "semshare-abc" and index.calls == [["b"]]


def test_the_app_names_the_index_to_the_router():
    from serve_app.app import model_deployment_options
    from serve_app.settings import resolve_args

    kw = model_deployment_options(resolve_args({"preset": "tiny-random", "index_name": "ix",
                                                "index_namespace": "nsx"}))["request_router_config"]
    assert kw.request_router_kwargs["index_name"] == "ix" and kw.request_router_kwargs["index_namespace"] == "nsx"


def test_default_routing_is_two_random_candidates_on_the_public_api():
    """Without a hot holder: two of the locality-preferred replicas at random (Serve's
    default procedure), using only ray.serve.request_router's public names."""
    import ast
    import inspect

    from serve_app import affinity_router

    tree = ast.parse(inspect.getsource(affinity_router))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "ray.serve.request_router" in imported and not any("_private" in m for m in imported)
    reps = [FakeReplica(n) for n in "abcd"]
    r = make_router({})
    r.apply_locality_routing = lambda pending_request=None: {x.replica_id for x in reps[:3]}
    seen = set()
    for _ in range(40):
        (rank,) = choose(r, reps, [])
        assert len(rank) == 2 and len(set(rank)) == 2 and reps[3] not in rank
        seen.update(x.name for x in rank)
    assert seen == {"a", "b", "c"}
    r.apply_locality_routing = lambda pending_request=None: set()  # nothing preferred: every candidate
    assert len(choose(r, reps[:1], [])[0]) == 1
    assert asyncio.run(r.two_choices([], None)) == []
