"""What the native decode-attention kernel changes in the tokens (SmolLM2 bf16, in-process).

    python -m benchmarks.decode_attention_quality --lengths 200 1000 --prompts 6 --tokens 64
    python -m benchmarks.decode_attention_quality --compiled   # + the compiled prefill and decode step

The kernel (:mod:`semshare_core.decode_kernel`) rounds differently from SDPA, so a bf16
decode with it is no longer bit-identical to ``model.generate``. Is it further from the
model than SDPA's bf16 decode? Per held-out prompt (prose documents of ``--lengths``
tokens, the benchmark's own corpus) the same weights run in float32 decode greedily (the
reference: no bf16 rounding of activations), and both bf16 decodes (SDPA and the kernel,
each after the same bf16 full prefill) are teacher-forced on the reference's tokens.
Reported per length and attention: top-1 agreement with the float32 reference (median,
min), and between the two bf16 attentions: teacher-forced top-1 agreement, the largest
logit difference relative to the logits' range, and how many free-running greedy
continuations are identical (first divergence otherwise).
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from .dataset import build_prompt, make_documents
from .results_io import save

RESULTS = Path(__file__).resolve().parent / "results"


def _greedy(engine, ids, n: int, kernel) -> list[int]:
    from semshare_core.batch import batch_step

    pre = engine.prefill(ids)
    toks = [int(pre.logits.argmax())]
    st = engine.decode_state(pre)
    for _ in range(n - 1):
        toks.append(int(batch_step(engine.model, [st], [toks[-1]], kernel)[0].argmax()))
    return toks


def _forced(engine, ids, toks: list[int], kernel) -> list[torch.Tensor]:
    """Logits of each step fed ``toks`` (the first from the prefill)."""
    from semshare_core.batch import batch_step

    pre = engine.prefill(ids)
    out = [pre.logits.float().reshape(-1)]
    st = engine.decode_state(pre)
    for t in toks[:-1]:
        out.append(batch_step(engine.model, [st], [t], kernel)[0])
    return out


def forced_compiled(engine, prompts, refs: list[list[int]]) -> list[float]:
    """Top-1 agreement of each prompt's ``refs`` tokens when ``engine`` (``compile_prefill`` and
    ``compile_decode`` on) prefills each prompt compiled and decodes all of them as ONE batch
    (the compiled step needs 2+ requests), teacher-forced on ``refs``."""
    pres = [engine.prefill(ids) for ids in prompts]
    tops = [[int(p.logits.argmax())] for p in pres]
    seqs = [engine.decode_state(p) for p in pres]
    for i in range(len(refs[0]) - 1):
        logits = engine.decode_step(seqs, [r[i] for r in refs])
        for t, row in zip(tops, logits):
            t.append(int(row.argmax()))
    return [sum(a == b for a, b in zip(t, r)) / len(r) for t, r in zip(tops, refs)]


def run(bf16, fp32, ids, n_tokens: int) -> dict:
    kern = bf16.decode_kernel
    with torch.inference_mode():
        ref = _greedy(fp32, ids, n_tokens, None)
        sd = _forced(bf16, ids, ref, None)
        nat = _forced(bf16, ids, ref, kern)
        free_s, free_n = _greedy(bf16, ids, n_tokens, None), _greedy(bf16, ids, n_tokens, kern)
    top_s = [int(x.argmax()) for x in sd]
    top_n = [int(x.argmax()) for x in nat]
    n = len(ref)
    worst = max(float((a - b).abs().max() / (a.max() - a.min())) for a, b in zip(sd, nat))
    diverge = next((i for i, (a, b) in enumerate(zip(free_s, free_n)) if a != b), None)
    return {"prompt_tokens": int(ids.size),
            "sdpa_vs_fp32": sum(a == b for a, b in zip(top_s, ref)) / n,
            "native_vs_fp32": sum(a == b for a, b in zip(top_n, ref)) / n,
            "native_vs_sdpa": sum(a == b for a, b in zip(top_s, top_n)) / n,
            "max_rel_logit_diff": worst, "identical": diverge is None, "first_divergence": diverge,
            "ref": ref}


def markdown(res: dict) -> str:
    lines = [f"# Native decode attention vs SDPA: tokens (`{res['name']}`)", "",
             f"SmolLM2-135M-Instruct, 1 thread, greedy, {res['tokens']} tokens per prompt. Reference: the same weights "
             "in float32. Both bf16 decodes are teacher-forced on the reference's tokens after the same bf16 full "
             "prefill; top-1 compared per step (the first token is the prefill's, the same for both).", "",
             "| length | prompts | bf16 SDPA vs fp32: agreement median (min) | bf16 native vs fp32 | "
             "native vs SDPA | max logit diff / logit range | identical free-running greedy (native vs SDPA) | "
             "first divergence |",
             "| ---: | ---: | --- | --- | --- | ---: | ---: | --- |"]
    for length, rows in res["by_length"].items():
        def col(k):
            xs = [r[k] for r in rows]
            return f"{statistics.median(xs):.3f} ({min(xs):.3f})"
        div = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
        lines.append(f"| ~{length} | {len(rows)} | {col('sdpa_vs_fp32')} | {col('native_vs_fp32')} | "
                     f"{col('native_vs_sdpa')} | {max(r['max_rel_logit_diff'] for r in rows):.4f} | "
                     f"{sum(r['identical'] for r in rows)} / {len(rows)} | {div or '-'} |")
    if any("compiled_vs_fp32" in r for rows in res["by_length"].values() for r in rows):
        lines += ["", "Compiled (`compile_prefill` + `compile_decode`, native attention): each prompt prefilled "
                  "by the compiled prefill, then the prompts of a length decoded as one batch by the compiled "
                  "step, teacher-forced on the same float32 tokens.", "",
                  "| length | prompts | bf16 compiled vs fp32: agreement median (min) | bf16 native (eager) vs fp32 |",
                  "| ---: | ---: | --- | --- |"]
        for length, rows in res["by_length"].items():
            xs, ys = [r["compiled_vs_fp32"] for r in rows], [r["native_vs_fp32"] for r in rows]
            lines.append(f"| ~{length} | {len(rows)} | {statistics.median(xs):.3f} ({min(xs):.3f}) | "
                         f"{statistics.median(ys):.3f} ({min(ys):.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from semshare_core import SemShareEngine
    from semshare_core.models import load_smollm2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--name", default="decode-attention-quality")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--compiled", action="store_true",
                   help="also bf16 with compile_prefill + compile_decode (the prompts of a length decoded as one batch)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lm = load_smollm2()
    bf16 = SemShareEngine(lm.model, lm.tokenizer, decode_attention="native")
    fp32 = SemShareEngine(load_smollm2(dtype="float32").model, lm.tokenizer, decode_attention="sdpa")
    compiled = None
    if a.compiled:
        compiled = SemShareEngine(lm.model, lm.tokenizer, decode_attention="native", compile_decode="on",
                                  compile_prefill="on")
        compiled.warm_compiled_prefill()
        compiled.warm_compiled_decode()
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    by_length = {}
    for length in a.lengths:
        docs = make_documents(a.prompts, length, count, seed=a.seed + length)
        prompts = [bf16.encode(build_prompt(d)) for d in docs]
        by_length[length] = [run(bf16, fp32, ids, a.tokens) for ids in prompts]
        if compiled is not None:
            with torch.inference_mode():
                agree = forced_compiled(compiled, prompts, [r["ref"] for r in by_length[length]])
            for r, x in zip(by_length[length], agree):
                r["compiled_vs_fp32"] = x
        print(length, by_length[length], flush=True)
    save(a.out_dir or RESULTS, a.name, {"name": a.name, "tokens": a.tokens, "by_length": by_length},
         markdown({"name": a.name, "tokens": a.tokens, "by_length": by_length}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
