"""``python -m benchmarks``: TTFT, KV memory and quality of SemShare vs a full prefill and a block prefix cache.

    python -m benchmarks                                   # = make bench: SmolLM2, CPU, 1k + 2k tokens, <= 25 min
    python -m benchmarks --quick                           # CPU smoke run (one length, 2 pairs, a few minutes)
    python -m benchmarks --sweep benchmarks/sweeps/schedule.yaml --methods full,prefix,semshare --name sweep
    python -m benchmarks --model llama3-8b-random --device cuda --quick --kv-placement device --jsonl --name gpu

Writes ``<out-dir>/<name>.json``, ``<name>.md`` and ``<name>_{speedup,quality,memory}.png``.
Imports only submodules of ``semshare_core`` it needs (no faiss, Ray or FastAPI).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# --quick on an accelerator: one device run of a few minutes (Llama-3.1-8B shape on one GPU)
QUICK_GPU = {"lengths": [2048, 4096, 8192, 16384], "edits": ["replace", "instruction"], "ratios": [0.1, 0.3],
             "pairs": 1, "fact_pairs": 1, "new_tokens": 8, "answer_tokens": 8, "reps": 5, "budget_s": 360.0,
             "memory_length": 4096, "memory_retentions": [1.0, 0.7, 0.5, 0.3]}
# --quick on CPU: a smoke run of the whole pipeline (one length, one prose and one fact pair)
QUICK_CPU = {"lengths": [1024], "edits": ["replace"], "ratios": [0.2], "pairs": 1, "fact_pairs": 1,
             "new_tokens": 16, "answer_tokens": 24, "reps": 5, "budget_s": 400.0}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def load_sweep(spec: str) -> dict[str, dict]:
    """``--sweep``: a .json / .yaml / .yml file, or inline JSON / YAML, mapping a method name to
    the ``SemShareConfig`` overrides of that method (e.g. ``{"r0.1": {"recompute_ratio": 0.1}}``)."""
    import json
    from pathlib import Path

    path = Path(spec)
    try:
        is_file = path.is_file()
    except OSError:  # an inline spec too long to be a path
        is_file = False
    text = path.read_text() if is_file else spec
    try:
        if is_file and path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # JSON is YAML too

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is a usage error
        raise SystemExit(f"--sweep: cannot parse {'file ' + str(path) if is_file else 'inline spec'}: {e}")
    if not isinstance(data, dict) or not data:
        raise SystemExit(f"--sweep: expected a mapping name -> {{config field: value}}, got {type(data).__name__}"
                         + ("" if is_file else f" (no file named {spec!r})"))
    out = {}
    for name, overrides in data.items():
        if not isinstance(overrides, dict):
            raise SystemExit(f"--sweep entry {name!r}: expected a mapping of SemShareConfig fields, got {overrides!r}")
        out[str(name)] = dict(overrides)
    return out


def parser() -> argparse.ArgumentParser:
    from .methods import DEFAULT_BLOCK, PLACEMENTS
    from .runner import DEFAULT_METHODS, MIN_REPS, MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--model-shape", choices=("full", "small"), default="full",
                   help="llama3-8b-random only: 'small' = same rope/GQA, tiny dims (CPU check)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 / float16 (default bf16; fp32 for tiny-random)")
    p.add_argument("--lengths", type=_ints, default=None, help="nominal prompt lengths [1024,2048]")
    p.add_argument("--edits", type=_strs, default=None, help="prose edit kinds [replace,mixed,instruction]")
    p.add_argument("--ratios", type=_floats, default=None, help="prose edit ratios [0.2]")
    p.add_argument("--pairs", type=int, default=None, help="prose documents per length (each gets every edit) [1]")
    p.add_argument("--fact-pairs", type=int, default=None, help="fact-edit pairs per length [4]")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="teacher-forced target tokens (full prefill's greedy continuation); 0 skips quality [32]")
    p.add_argument("--answer-tokens", type=int, default=None, help="greedy answer tokens on fact pairs [24]")
    p.add_argument("--reps", type=int, default=None,
                   help=f"timed interleaved rounds after one warm-up [{MIN_REPS}; presets below {MIN_REPS} are raised "
                        f"to {MIN_REPS}, an explicit --reps is taken as is]")
    p.add_argument("--methods", type=_strs, default=list(DEFAULT_METHODS),
                   help="built-in methods (full is always run: it is the baseline)")
    p.add_argument("--sweep", default=None, metavar="FILE|SPEC",
                   help="extra SemShare methods: a JSON/YAML file or inline spec mapping a name to SemShareConfig "
                        "overrides, e.g. '{\"r0.1\": {\"recompute_ratio\": 0.1}}'")
    p.add_argument("--base-config", default=None, metavar="JSON",
                   help="SemShareConfig overrides under every method (the engine default otherwise), "
                        "e.g. '{\"recompute_min_tokens\": 0}' for prompts of a few hundred tokens")
    p.add_argument("--pruned-retention", type=float, default=0.5)
    p.add_argument("--memory-length", type=int, default=None, help="length for the retention sweep [middle length]")
    p.add_argument("--memory-retentions", type=_floats, default=None,
                   help="retentions for the decode-memory table; values other than 1 and --pruned-retention add "
                        "semshare_ret<r> methods at --memory-length [1.0,0.5]")
    p.add_argument("--kv-placement", choices=PLACEMENTS, default="host",
                   help="reference KV: host (numpy, zero-copy), bytes (PackedKV.from_bytes per prefill), "
                        "device (on the accelerator)")
    p.add_argument("--prefix-block", type=int, default=DEFAULT_BLOCK, help="block size of the prefix cache (tokens)")
    p.add_argument("--quick", action="store_true",
                   help="preset: on CPU a smoke run (1024 tokens, 1 prose + 1 fact pair); on CUDA a ~8 minute run")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new pairs after this many seconds [1380; 0 = no limit]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads [1 on CPU]")
    p.add_argument("--name", default=None, help="result file stem [<model>-<device>]")
    p.add_argument("--out-dir", default=None, help="[benchmarks/results]")
    p.add_argument("--jsonl", action="store_true", help="print one JSON line per record to stdout as it goes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only rewrite <name>.md and the plots from an existing result JSON (no model run)")
    return p


def config_from_args(args: argparse.Namespace):
    from .dataset import EDIT_KINDS
    from .runner import MIN_REPS, BenchConfig, validate

    bc = BenchConfig(model=args.model, device=args.device, dtype=args.dtype, model_shape=args.model_shape,
                     methods=args.methods, pruned_retention=args.pruned_retention, kv_placement=args.kv_placement,
                     prefix_block=args.prefix_block, seed=args.seed, jsonl=args.jsonl, progress=not args.no_progress,
                     threads=args.threads)
    if "full" not in bc.methods:
        bc.methods = ["full"] + list(bc.methods)
    if args.quick:
        for k, v in (QUICK_GPU if bc.device.startswith("cuda") else QUICK_CPU).items():
            setattr(bc, k, v)
    bc.reps = max(bc.reps, MIN_REPS)  # presets never go below the minimum; an explicit --reps does
    for k in ("lengths", "edits", "ratios", "pairs", "fact_pairs", "new_tokens", "answer_tokens", "reps", "budget_s",
              "memory_length", "memory_retentions", "out_dir"):
        v = getattr(args, k)
        if v is not None:
            setattr(bc, k, v)
    if bc.budget_s is not None and bc.budget_s <= 0:
        bc.budget_s = None
    if args.sweep:
        bc.sweep = load_sweep(args.sweep)
    if args.base_config:
        try:
            bc.base_config = dict(json.loads(args.base_config))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"--base-config: expected a JSON object of SemShareConfig fields: {e}")
    bc.name = args.name or f"{args.model}-{args.device.split(':')[0]}"
    bad = [e for e in bc.edits if e not in EDIT_KINDS]
    if bad:
        raise SystemExit(f"unknown edit kinds {bad}; choose from {EDIT_KINDS}")
    if bc.reps < 1:
        raise SystemExit("--reps must be >= 1")
    if bc.prefix_block < 1:
        raise SystemExit("--prefix-block must be >= 1")
    try:
        validate(bc)  # unknown methods, unknown config fields, invalid values: fail before loading a model
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if bc.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU")
    if bc.kv_placement == "device" and not bc.device.startswith("cuda"):
        print("note: --kv-placement device on CPU keeps the reference as a torch tensor (no fetch)", file=sys.stderr)
    return bc


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .report import write_all

    if args.replot:
        import json
        from pathlib import Path

        src = Path(args.replot)
        result = json.loads(src.read_text())
        paths = write_all(result, args.out_dir or src.parent, args.name or src.stem, with_plots=not args.no_plots)
        for kind, path in paths.items():
            print(f"wrote {kind}: {path}", file=sys.stderr)
        return 0
    bc = config_from_args(args)
    from .runner import run

    result = run(bc)
    paths = write_all(result, bc.out_dir, bc.name, with_plots=not args.no_plots)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
