"""Writing a benchmark's result: ``<out>/<name>.json`` (the data) and ``<name>.md`` (its table)."""
from __future__ import annotations

import json
from pathlib import Path


def save(out_dir: str | Path, name: str, result: dict, markdown: str) -> Path:
    """Write ``result`` as JSON and ``markdown`` next to it; print the markdown; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    return path
