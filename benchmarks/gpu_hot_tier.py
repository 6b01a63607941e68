"""GPU check of the hot tier (run on a CUDA machine): what a hot hit saves over a cold one.

    python -m benchmarks.gpu_hot_tier

1. Llama-3.1-8B-shaped KV (32 layers, 8 KV heads, head dim 128, bf16) at 1k/4k tokens:
   a cold hit's conversion = host (object-store) array -> device, pageable and pinned;
   a hot hit = the tier's get (the tensor is already on the device).
2. If the project imports here: the tiny engine on CUDA; a hit prefill with the hot
   device KV (``reference_kv``, as ``ReusePath`` passes it) equals the host-path hit.
Prints JSON lines.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import numpy as np
    import torch

    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}), flush=True)
    if not torch.cuda.is_available():
        return 1
    dev = torch.device("cuda")
    for n in (1024, 4096):
        host = np.random.default_rng(0).integers(0, 1 << 14, size=(32, 2, 8, n, 128), dtype=np.uint16)
        t = torch.from_numpy(host).view(torch.bfloat16)
        t.to(dev); torch.cuda.synchronize()
        res = {"tokens": n, "kv_mb": round(host.nbytes / 2**20, 1)}
        for name, src in (("pageable", t), ("pinned", t.pin_memory())):
            ts = []
            for _ in range(5):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                d = src.to(dev, non_blocking=(name == "pinned")); torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
                del d
            res[f"cold_h2d_{name}_ms"] = round(sorted(ts)[2], 2)
        try:
            from serve_app.hot_tier import HotEntry, HotTier
            tier = HotTier(8 << 30)
            kv = t.to(dev)
            tier.put(HotEntry("u", "t:k", None, kv, kv.numel() * 2, 0, True))
            t0 = time.perf_counter(); e = tier.get("u"); res["hot_get_ms"] = round((time.perf_counter() - t0) * 1e3, 4)
            assert e.kv.device.type == "cuda"
        except Exception as ex:  # noqa: BLE001
            res["hot_tier_error"] = f"{type(ex).__name__}: {ex}"
        print(json.dumps(res), flush=True)
    try:
        from semshare_core import SemShareEngine
        from semshare_core.models import corpus_text, tiny_random

        lm = tiny_random("llama")
        lm.model.to(dev)
        eng = SemShareEngine(lm.model, lm.tokenizer)
        text = " ".join(corpus_text()[5000:6500].split())
        words = text.split()
        variant = " ".join(words[:60] + ["an edited stretch"] * 5 + words[75:])
        ids, vids = eng.encode(text), eng.encode(variant)
        pre = eng.prefill(ids)
        packed = eng.export_kv(pre)
        with torch.inference_mode():  # as ReusePath._device_copy: stacked from the prefill's device tensors
            hot = torch.stack([torch.stack([k[0], v[0]]) for k, v in zip(pre.keys, pre.values)])
        a = eng.prefill(vids, packed, reference_kv=hot)
        b = eng.prefill(vids, packed)
        print(json.dumps({"engine_on_cuda": True, "hit": bool(a.stats.hit), "hot_kv_device": str(hot.device),
                          "max_logit_diff_hot_vs_host": float((a.logits.float().cpu() - b.logits.float().cpu()).abs().max()),
                          "same_argmax": int(a.logits.argmax()) == int(b.logits.argmax())}), flush=True)
    except Exception as ex:  # noqa: BLE001
        print(json.dumps({"engine_error": f"{type(ex).__name__}: {ex}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
