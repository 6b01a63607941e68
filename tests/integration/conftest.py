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

    def wait_entries(self, n: int, timeout: float = 30) -> dict:
        """Registration is fire-and-forget: poll the stats until ``n`` entries exist."""
        deadline = time.time() + timeout
        while True:
            st = self.http.get("/v1/cache/stats")
            if st.status_code == 200 and st.json()["entries"] >= n:
                return st.json()
            if time.time() > deadline:
                raise AssertionError(f"index never reached {n} entries: {st.text}")
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
