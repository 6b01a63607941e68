"""The compiled arm of the decode-quality benchmark on a tiny fp32 model: teacher-forced on
the eager engine's own greedy tokens, the compiled prefill + batched compiled step agree."""
from __future__ import annotations

import pytest
import torch

from benchmarks.decode_attention_quality import _greedy, forced_compiled, markdown
from semshare_core.compiled_common import compiler_available


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler: inductor cannot build here")
def test_forced_compiled_agrees_with_the_eager_greedy_tokens_in_fp32():
    from semshare_core import SemShareEngine
    from tests.unit.test_batch_decode import _ids
    from tests.unit.tiny import tiny_engine

    eager = tiny_engine("llama")
    compiled = SemShareEngine(eager.model, eager.tokenizer, eager.config, compile_decode="on", compile_prefill="on")
    prompts = [_ids(eager, 0, 3), _ids(eager, 40, 5)]
    with torch.inference_mode():
        refs = [_greedy(eager, p, 10, None) for p in prompts]
        agree = forced_compiled(compiled, prompts, refs)
    assert agree == [1.0, 1.0]
    assert compiled.compiled_decode.compiled_steps >= 9 and compiled.compiled_prefill.compiled_chunks >= 2
    row = {"sdpa_vs_fp32": 1.0, "native_vs_fp32": 1.0, "native_vs_sdpa": 1.0, "max_rel_logit_diff": 0.0,
           "identical": True, "first_divergence": None, "compiled_vs_fp32": agree[0]}
    md = markdown({"name": "t", "tokens": 10, "by_length": {20: [row, row]}})
    assert "bf16 compiled vs fp32" in md and "| ~20 | 2 | 1.000 (1.000) | 1.000 (1.000) |" in md
