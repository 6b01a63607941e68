"""One Ray instance + Serve app per test session (tiny-random preset, loopback only)."""
from __future__ import annotations

import os
import socket
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

INDEX_NAME = "semshare_index_it"
INDEX_NS = "semshare_it"
APP_ARGS = {
    "preset": "tiny-random",
    "num_replicas": 2,
    "num_cpus": 0.5,
    "ingress_num_cpus": 0.1,
    "index_name": INDEX_NAME,
    "index_namespace": INDEX_NS,
    "index_max_items": 64,
    "index_max_bytes": 8 << 20,
    "max_prompt_tokens": 1024,
    "max_new_tokens": 64,
    "lookup_timeout_s": 2.0,
    "api_keys_env": None,  # open mode whatever the environment holds
    "admin_keys_env": None,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str):
        import httpx

        self.base = base
        self.http = httpx.Client(base_url=base, timeout=120)

    def gen(self, prompt: str, **kw) -> dict:
        r = self.http.post("/v1/generate", json={"prompt": prompt, **kw})
        assert r.status_code == 200, r.text
        return r.json()

    def index_actor(self):
        import ray

        return ray.get_actor(INDEX_NAME, namespace=INDEX_NS)

    def index_actor_entries(self) -> list:
        import ray

        return ray.get(self.index_actor().entries.remote(), timeout=30)

    def index_stats(self) -> dict:
        """All tenants' stats, from the actor (open mode has no admin over HTTP)."""
        import ray

        return ray.get(self.index_actor().stats.remote(), timeout=30)

    def wait_entries(self, n: int, timeout: float = 30, tenant: str | None = None) -> dict:
        """Registration is fire-and-forget: poll the stats until ``n`` entries exist."""
        deadline = time.time() + timeout
        while True:
            try:
                st = self.index_stats()
                got = st["entries"] if tenant is None else st["tenants"].get(tenant, {}).get("entries", 0)
                if got >= n:
                    return st
            except Exception as e:  # noqa: BLE001 - the actor may be restarting
                st = repr(e)
            if time.time() > deadline:
                raise AssertionError(f"index never reached {n} entries: {st}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def server():
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(APP_ARGS), name="semshare", route_prefix="/")
    srv = Server(f"http://127.0.0.1:{port}")
    try:
        yield srv
    finally:
        srv.http.close()
        serve.shutdown()
        ray.shutdown()


# A second app in the same Serve instance, at /h: API keys (file + inline admin key),
# small limits, a slow decode (fault injection) so streams last long enough to be cut.
H_INDEX = "semshare_index_hard"
H_KEYS = {"sk-alice-0123456789": "alice", "sk-bob-0123456789": "bob", "sk-carol-0123456789": "carol"}
H_ADMIN = "sk-admin-0123456789"
H_ARGS = {
    "preset": "tiny-random",
    "num_replicas": 2,
    "num_cpus": 0.2,
    "ingress_num_cpus": 0.05,
    "index_name": H_INDEX,
    "index_namespace": INDEX_NS,
    "index_max_items": 32,
    "index_max_bytes": 8 << 20,
    "tenant_max_items": 2,
    "max_prompt_tokens": 256,
    "max_new_tokens": 48,
    "max_body_bytes": 4096,
    "max_concurrent_requests": 4,
    "max_ongoing_requests": 2,
    "max_queued_requests": 2,
    "request_timeout_s": 4.0,
    "lookup_timeout_s": 5.0,
    "retry_after_s": 2,
    "fault_decode_delay_s": 0.1,
    "admin_keys": [H_ADMIN],
    "api_keys_env": None,
    "admin_keys_env": None,
}


@pytest.fixture(scope="session")
def hardened(server, tmp_path_factory):
    import httpx
    from ray import serve

    from serve_app.app import build_app

    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("# tenant keys\n" + "\n".join(f"{k}={t}" for k, t in H_KEYS.items()) + "\n")
    serve.run(build_app({**H_ARGS, "api_keys_file": str(keyfile)}), name="hardened", route_prefix="/h")
    client = httpx.Client(base_url=server.base + "/h", timeout=60)
    # warm up: the index actor process starts (imports torch + faiss) on first use
    import ray

    deadline = time.time() + 90
    while True:
        try:
            ray.get(ray.get_actor(H_INDEX, namespace=INDEX_NS).ping.remote(), timeout=10)
            break
        except Exception:  # noqa: BLE001 - not created / not started yet
            assert time.time() < deadline, "the hardened app's index actor never started"
            time.sleep(0.5)
    for i in range(4):
        client.post("/v1/generate", json={"prompt": f"warm up {i}", "max_new_tokens": 1, "use_semshare": True},
                    headers={"Authorization": f"Bearer {H_ADMIN}"})
    try:
        yield client
    finally:
        client.close()
        serve.delete("hardened")


@pytest.fixture(scope="module")
def engine():
    """A tiny random Llama engine (no Ray): for tests that build KV to register directly."""
    from semshare_core import SemShareEngine
    from semshare_core.models import tiny_random

    lm = tiny_random("llama")
    return SemShareEngine(lm.model, lm.tokenizer)
