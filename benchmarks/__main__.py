"""``python -m benchmarks``: TTFT, KV memory and quality of SemShare vs full prefill and prefix reuse.

    python -m benchmarks --model smollm2 --device cpu --lengths 512,1024,2048 \\
        --edits replace,mixed,instruction --ratios 0.1,0.3,0.5 --pairs 1 --new-tokens 32 --name cpu-smollm2
    python -m benchmarks --model llama3-8b-random --device cuda --quick --kv-placement device --jsonl --name gpu

Writes ``<out-dir>/<name>.json``, ``<name>.md`` and ``<name>_{speedup,quality,memory}.png``.
Imports only submodules of ``semshare_core`` it needs (no faiss, Ray or FastAPI).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# --quick: one device run of a few minutes (Llama-3.1-8B shape on one GPU)
QUICK = {"lengths": [2048, 4096, 8192, 16384], "edits": ["replace", "instruction"], "ratios": [0.1, 0.3],
         "pairs": 1, "new_tokens": 8, "reps": 2, "budget_s": 360.0, "memory_length": 4096}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    from .runner import DEFAULT_METHODS, MODELS
    from .methods import PLACEMENTS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--model-shape", choices=("full", "small"), default="full",
                   help="llama3-8b-random only: 'small' = same rope/GQA, tiny dims (CPU check)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 / float16 (default bf16; fp32 for tiny-random)")
    p.add_argument("--lengths", type=_ints, default=None, help="nominal prompt lengths [512,1024,2048]")
    p.add_argument("--edits", type=_strs, default=None, help="edit kinds [replace,mixed,instruction]")
    p.add_argument("--ratios", type=_floats, default=None, help="edit ratios [0.1,0.3,0.5]")
    p.add_argument("--pairs", type=int, default=None, help="documents per length (each gets every edit) [1]")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens for quality; 0 skips quality [32]")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions after one warm-up [2]")
    p.add_argument("--methods", type=_strs, default=list(DEFAULT_METHODS),
                   help="also: semshare_r1 (recompute everything: must equal full)")
    p.add_argument("--pruned-retention", type=float, default=0.5)
    p.add_argument("--memory-length", type=int, default=None, help="length for the retention sweep [middle length]")
    p.add_argument("--memory-retentions", type=_floats, default=[1.0, 0.7, 0.5, 0.3])
    p.add_argument("--kv-placement", choices=PLACEMENTS, default="bytes",
                   help="reference KV: bytes (PackedKV.from_bytes per prefill), host (numpy), device (on the GPU)")
    p.add_argument("--quick", action="store_true", help="GPU preset fitting one ~8 minute device run")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new pairs after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch default; 1 for tiny-random]")
    p.add_argument("--name", default=None, help="result file stem [<model>-<device>]")
    p.add_argument("--out-dir", default=None, help="[benchmarks/results]")
    p.add_argument("--jsonl", action="store_true", help="print one JSON line per record to stdout as it goes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only rewrite <name>.md and the plots from an existing result JSON (no model run)")
    return p


def config_from_args(args: argparse.Namespace):
    from .runner import BenchConfig

    bc = BenchConfig(model=args.model, device=args.device, dtype=args.dtype, model_shape=args.model_shape,
                     methods=args.methods, pruned_retention=args.pruned_retention,
                     memory_retentions=args.memory_retentions, kv_placement=args.kv_placement, seed=args.seed,
                     jsonl=args.jsonl, progress=not args.no_progress,
                     threads=args.threads)
    if args.quick:
        for k, v in QUICK.items():
            setattr(bc, k, v)
    for k in ("lengths", "edits", "ratios", "pairs", "new_tokens", "reps", "budget_s", "memory_length", "out_dir"):
        v = getattr(args, k)
        if v is not None:
            setattr(bc, k, v)
    bc.name = args.name or f"{args.model}-{args.device.split(':')[0]}"
    from .dataset import EDIT_KINDS

    bad = [e for e in bc.edits if e not in EDIT_KINDS]
    if bad:
        raise SystemExit(f"unknown edit kinds {bad}; choose from {EDIT_KINDS}")
    if bc.reps < 1:
        raise SystemExit("--reps must be >= 1")
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
