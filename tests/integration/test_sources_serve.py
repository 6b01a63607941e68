"""Several cached prompts reused at once, through Serve: a RAG-shaped prompt whose passages
were cached in different prompts draws rows from each (usage per source); another tenant's
or salt's entries are never used; a damaged source is dropped and reported, and the
request still succeeds."""
from __future__ import annotations

import time

import pytest

from semshare_core.models import corpus_text

pytestmark = pytest.mark.ray

_CORPUS = corpus_text()
INSTR = "Answer the question from the passages below."


def passage(i: int, chars: int = 260) -> str:
    start = 300000 + i * 3000
    return " ".join(_CORPUS[start:start + chars].split())


def gen(server, prompt: str, tenant: str, **kw):
    r = server.http.post("/v1/generate", json={"prompt": prompt, "temperature": 0, "max_new_tokens": 3, **kw},
                         headers={"X-Tenant": tenant})
    assert r.status_code == 200, r.text
    return r.json()


def rag(ps: list[int], q: str) -> str:
    return INSTR + "\n\n" + "\n\n".join(passage(i) for i in ps) + f"\n\nQuestion: {q}"


def _cache_three(server, tenant: str) -> list[str]:
    keys = []
    for j, ps in enumerate(([0, 1, 2], [3, 4, 5], [6, 7, 8])):
        key = f"doc{j}"
        gen(server, rag(ps, f"what is said in part {j}?"), tenant, store_key=key)
        keys.append(key)
    return keys


def test_rag_prompt_reuses_several_sources_and_stays_in_its_tenant(server):
    tenant = "ragsrc"
    _cache_three(server, tenant)
    new = rag([4, 0, 7], "which passages mention a list?")
    r = gen(server, new, tenant)
    assert r["cache_hit"], r
    sources = r["usage"].get("sources")
    assert sources and len(sources) >= 2, r["usage"]
    assert sum(s["reused_tokens"] > 0 for s in sources) >= 2, sources
    assert {s["key"] for s in sources} <= {"doc0", "doc1", "doc2"}
    assert r["usage"]["reused_tokens"] > max(s["reused_tokens"] for s in sources)  # more than any one entry gives
    # the new prompt is registered as one entry, one derivation deeper than its sources
    assert r["store_key"] and r["depth"] == 1
    # another tenant, or the same tenant under another salt, sees none of these entries
    other = gen(server, new, "ragsrc-other")
    assert other["cache_hit"] is False and not other["usage"].get("sources")
    salted = server.http.post("/v1/generate", json={"prompt": new, "temperature": 0, "max_new_tokens": 3,
                                                    "cache_salt": "s1"}, headers={"X-Tenant": tenant}).json()
    assert salted["cache_hit"] is False and not salted["usage"].get("sources")


def test_a_damaged_source_is_dropped_and_reported(server):
    """Entries registered straight into the index (no replica holds them hot), so every
    source is fetched cold and checked; one is another model's KV."""
    import ray

    from conftest import APP_ARGS
    from semshare_core import SemShareEngine
    from serve_app.front import PromptCodec
    from serve_app.settings import load_model, resolve_args

    args = resolve_args(APP_ARGS)
    lm = load_model(args)  # the replicas' tiny model (same seed: same signature)
    engine = SemShareEngine(lm.model, lm.tokenizer, args.semshare_config())
    codec = PromptCodec(lm.tokenizer, engine.config)
    tenant = "ragbad"
    actor = server.index_actor()
    for j, ps in enumerate(([0, 1, 2], [3, 4, 5], [6, 7, 8])):
        ids = codec.tokenize(rag(ps, f"part {j}?"), None, args.max_prompt_tokens)
        packed = engine.export_kv(engine.prefill(ids))
        out = ray.get(actor.register.remote(f"{tenant}:doc{j}", codec.fingerprint(ids), ids, packed, tenant, 0))
        assert out["stored"], out
    bad = f"{tenant}:doc1"
    assert ray.get(actor.inject_fault.remote(bad, "foreign")) is True
    r = gen(server, rag([0, 1, 3, 7, 8], "what do the passages say?"), tenant)  # doc1 gives one passage of five
    assert r["cache_hit"] and r["cache_tier"] == "cold", f"{r['fallback']} {r['usage']} {r['retrieved_sim']}"  # succeeds on the others
    keys = {s["key"] for s in r["usage"].get("sources") or [{"key": r["ref_key"]}]}
    assert "doc1" not in keys and keys <= {"doc0", "doc2"}
    assert r["fallback"] == "kv_mismatch"
    deadline = time.time() + 30
    while bad in [e["key"] for e in ray.get(actor.entries.remote())]:
        assert time.time() < deadline, "the damaged source was never reported"
        time.sleep(0.2)
