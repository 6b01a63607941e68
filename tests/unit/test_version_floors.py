"""pyproject's dependency floors cover the APIs the code uses."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def floors() -> dict[str, Version]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        req = Requirement(d)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            out[req.name] = max(lows)
    return out


def test_torch_floor_has_enable_gqa():
    # scaled_dot_product_attention(..., enable_gqa=True) appeared in torch 2.5
    uses = re.search(r"enable_gqa\s*=", (ROOT / "semshare_core" / "attention.py").read_text())
    assert uses and floors()["torch"] >= Version("2.5")


def test_ray_floor_has_the_request_router_config():
    # serve.config.RequestRouterConfig (request_router_kwargs -> initialize_state) is new in Ray 2.48.0;
    # 2.47 only took request_router_class on the deployment
    assert "RequestRouterConfig" in (ROOT / "serve_app" / "app.py").read_text()
    assert floors()["ray"] >= Version("2.48")


def test_transformers_floor_is_kept():
    assert Version("5.17") <= floors()["transformers"] < Version("6")
