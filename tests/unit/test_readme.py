"""The README's Python API example runs as written (with a tiny model in place of SmolLM2)."""
from __future__ import annotations

import re
from pathlib import Path

import semshare_core.models as models

from .tiny import prose

README = Path(__file__).resolve().parents[2] / "README.md"


def python_api_snippet() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(monkeypatch, capsys):
    code = python_api_snippet()
    assert "load_smollm2(" in code and "export_kv(pre)" in code
    monkeypatch.setattr(models, "load_smollm2", lambda **kw: models.tiny_random("llama"))
    ns: dict = {}
    exec(compile(code, "README.md:python-api", "exec"), ns)
    doc = " ".join(prose(0, 10))
    first = ns["answer"](doc)
    second = ns["answer"](doc.replace(" the ", " a ", 3))  # a variant: served from the first's KV
    assert isinstance(first, str) and isinstance(second, str)
    assert len(ns["index"]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("False") and printed[1].startswith("True")  # miss, then hit
