"""The concurrency sweep's pure parts: prompts, SSE parsing, ITL attribution, summaries, tables."""
from __future__ import annotations

import json

import pytest

from benchmarks import openai_stream as oai
from benchmarks import sweep_report, sweep_workloads
from benchmarks.load import main, pct


def _count(s: str) -> int:
    return len(s.split())


def test_percentiles_nearest_rank():
    xs = [float(x) for x in range(1, 11)]
    assert pct(xs, 0) == 1.0 and pct(xs, 100) == 10.0
    assert pct(list(reversed(xs)), 50) in (5.0, 6.0)
    assert pct([3.0, 1.0, 2.0], 99) == 3.0


def test_itl_attribution_single_and_multi_token_chunks():
    assert oai.itl_samples([], 5) == [] and oai.itl_samples([10.0], 1) == []
    # one token per chunk: the plain gaps
    assert oai.itl_samples([0.0, 10.0, 30.0], 3) == [10.0, 20.0]
    # 8 tokens in 4 chunks: two tokens per chunk, each gap shared by two tokens
    assert oai.itl_samples([0.0, 10.0, 20.0, 40.0], 8) == [5.0, 5.0, 10.0]
    # usage missing: one token per chunk; fewer tokens than chunks never inflates the gap
    assert oai.itl_samples([0.0, 4.0], None) == [4.0]
    assert oai.itl_samples([0.0, 4.0, 8.0], 1) == [4.0, 4.0]


def _events(*objs):
    return [oai.parse_sse_line("data: " + (o if isinstance(o, str) else json.dumps(o))) for o in objs]


def test_stream_recorder_ours_and_peer():
    # our server: text chunks, a final chunk with the semshare object, then usage
    ev = _events({"choices": [{"text": "Hel"}], "usage": None}, {"choices": [{"text": ""}]},
                 {"choices": [{"text": "lo"}]},
                 {"choices": [{"text": "", "finish_reason": "length"}], "semshare": {"cache_hit": True}},
                 {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 4,
                                           "prompt_tokens_details": {"cached_tokens": 90}}}, "[DONE]")
    rec = oai.StreamRecorder(0.0)
    for t, e in zip([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], ev):
        rec.feed(e, t)
    r = rec.record(200, 0.7)
    assert r["chunks"] == 2 and r["completion_tokens"] == 4 and r["cache_hit"] is True
    assert r["ttft_ms"] == pytest.approx(100.0) and r["latency_ms"] == pytest.approx(700.0)
    assert r["itl_ms"] == [pytest.approx(100.0)]  # one 200 ms gap over 2 tokens per chunk
    assert r["cached_tokens"] == 90 and r["finish_reason"] == "length" and r["done_marker"]
    # a peer: no semshare object, the hit comes from cached_tokens
    rec = oai.StreamRecorder(0.0)
    for t, e in zip([0.1, 0.2], _events({"choices": [{"text": "a"}]},
                                        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                                                  "prompt_tokens_details": {"cached_tokens": 0}}})):
        rec.feed(e, t)
    r = rec.record(200, 0.3)
    assert r["cache_hit"] is False and "semshare" not in r and r["itl_ms"] == []
    # in-band error
    rec = oai.StreamRecorder(0.0)
    rec.feed(oai.parse_sse_line('data: {"error": {"message": "boom", "type": "internal_error"}}'), 0.1)
    assert rec.record(200, 0.2)["error"] == "boom"
    assert oai.parse_sse_line(": keep-alive") is None and oai.parse_sse_line("data: [DONE]") == "[DONE]"


def test_completion_body():
    b = oai.completion_body("m", "p", 7, "salt-1")
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["temperature"] == 0.0 and b["max_tokens"] == 7 and b["cache_salt"] == "salt-1"
    assert "cache_salt" not in oai.completion_body("m", "p", 7) and "ignore_eos" not in b


def _sentences(n=4000):
    return [f"Sentence number {i} has some words in it." for i in range(n)]


def test_sweep_prompts_fresh_per_level_and_deterministic():
    kw = dict(seed=3, decode_tokens=30, reuse_tokens=120, repeat_lengths=(60, 120), repeat_n=2,
              pool_sentences=20, sentences=_sentences())
    a = sweep_workloads.build_sweep(_count, [1, 2, 8], **kw)
    b = sweep_workloads.build_sweep(_count, [1, 2, 8], **kw)
    assert a == b
    assert len(a.levels[1].decode) == 8 and len(a.levels[8].decode) == 16
    assert len(a.levels[8].families) == 3  # ceil(8 / (2 variants + 1 repeat))
    refs = [f.reference for lv in a.levels.values() for f in lv.families]
    decode = [p for lv in a.levels.values() for p in lv.decode]
    rep = [p for ps in a.repeat.values() for p in ps]
    everything = refs + decode + rep
    assert len(set(everything)) == len(everything)  # no prompt repeated across requests / levels
    for lv in a.levels.values():
        for f in lv.families:
            assert f.repeats == [f.reference] and len(f.variants) == 2
            assert all(v != f.reference for v in f.variants) and all(0.1 <= r <= 0.3 for r in f.ratios)
    first, rest = sweep_workloads.reuse_phases(a.levels[8].families)
    assert [x["kind"] for x in first] == ["reference"] * 3
    assert sorted(x["kind"] for x in rest) == ["repeat"] * 3 + ["variant"] * 6
    with pytest.raises(sweep_workloads.OutOfProse):
        sweep_workloads.build_sweep(_count, [16], seed=0, reuse_tokens=10_000, sentences=_sentences(300))


def _rec(kind, status=200, ttft=10.0, lat=100.0, tokens=4, itl=(5.0,), hit=None, prompt=100, cached=0):
    r = {"kind": kind, "status": status, "ttft_ms": ttft if status == 200 else None, "latency_ms": lat,
         "completion_tokens": tokens, "chunks": tokens, "itl_ms": list(itl), "prompt_tokens": prompt,
         "cached_tokens": cached}
    if hit is not None:
        r["cache_hit"] = hit
    return r


def test_summarize_level_and_scaling():
    recs = [_rec("reference", ttft=50, hit=False), _rec("repeat", ttft=5, hit=True, cached=90),
            _rec("variant", ttft=20, hit=True, cached=40, itl=(4.0, 6.0)), _rec("variant", status=503, tokens=0)]
    s = sweep_report.summarize_level(recs, 2.0)
    assert s["ok"] == 3 and s["non_200"] == 1 and s["output_tokens"] == 12
    assert s["tokens_per_s"] == 6.0 and s["requests_per_s"] == 1.5
    assert s["ttft_p50_ms"] == 20 and s["ttft_p99_ms"] == 50
    assert s["itl_p50_ms"] == 5.0 and s["itl_p99_ms"] == 6.0
    assert s["hit_rate"] == pytest.approx(0.667, abs=1e-3) and s["cached_share"] == pytest.approx(0.433, abs=1e-3)
    assert s["by_kind"]["repeat"]["hit_rate"] == 1.0 and s["by_kind"]["reference"]["hit_rate"] == 0.0
    s2 = sweep_report.summarize_level([_rec("decode", tokens=10)], 1.0)
    assert s2["hit_rate"] is None and s2["tokens_per_s"] == 10.0
    levels = sweep_report.add_scaling({"1": dict(s), "4": dict(s2)})
    assert levels["1"]["tokens_per_s_vs_1"] == 1.0 and levels["4"]["tokens_per_s_vs_1"] == pytest.approx(10 / 6, abs=1e-3)


def test_repeat_summary():
    pairs = [{"length": 1024, "first": _rec("x", ttft=t, prompt=1000), "repeat": _rec("x", ttft=r, cached=992, hit=True)}
             for t, r in [(100, 10), (120, 20), (110, 30)]]
    pairs.append({"length": 1024, "first": _rec("x", status=500), "repeat": _rec("x")})
    s = sweep_report.summarize_repeat(pairs)["1024"]
    assert s["pairs"] == 3 and s["failed"] == 1 and s["repeat_hits"] == 3
    assert s["first_ttft_ms"] == {"median": 110, "min": 100, "max": 120, "n": 3}
    assert s["repeat_ttft_ms"]["median"] == 20 and s["first_over_repeat_median"] == 5.5


def _result(label, tps, ttft, itl):
    lv = {}
    for c, k in (("1", 1.0), ("8", 3.0)):
        s = sweep_report.summarize_level([_rec("decode", ttft=ttft * k, tokens=int(tps * k), itl=(itl,))], 1.0)
        lv[c] = s
    sweep_report.add_scaling(lv)
    return {"name": f"load-{label}", "target": {"label": label, "url": "u", "model": "m"},
            "conditions": {"machine": "m", "loadavg_before": [0, 0, 0], "loadavg_after": [1, 1, 1], "client_cores": [0]},
            "config": {"decode_tokens": 100, "decode_new_tokens": 128, "decode_min": 8, "decode_per_client": 2,
                       "reuse_tokens": 1024, "variants": 2, "repeats": 1, "reuse_new_tokens": 32, "salt": True},
            "workloads": {"decode": lv}}


def test_markdown_and_compare_table(tmp_path):
    ours, peer = _result("ours", 40, 100, 20.0), _result("vllm", 80, 50, 10.0)
    md = sweep_report.markdown(ours)
    assert "| decode-heavy | 8 | 1 / 1 | 120.0 | 3.00 |" in md
    t = sweep_report.combine_table(ours, peer)
    assert "| decode-heavy | 1 | 40.0 | 80.0 | 0.50 | 1.00 | 1.00 | 100 | 50 | 2.00 |" in t
    assert "| decode-heavy | 8 | 120.0 | 240.0 | 0.50 |" in t
    (tmp_path / "a.json").write_text(json.dumps(ours))
    (tmp_path / "b.json").write_text(json.dumps(peer))
    assert main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-dir", str(tmp_path),
                 "--name", "cmp"]) == 0
    assert "ITL p50 ratio" in (tmp_path / "cmp.md").read_text()


def test_onoff_takes_one_concurrency():
    with pytest.raises(SystemExit):
        main(["--workload", "onoff", "--concurrency", "1,2", "--url", "http://127.0.0.1:9"])


def test_legacy_onoff_combine_still_works(tmp_path):
    from benchmarks.load import summarize

    recs = [{"i": 0, "kind": "similar", "status": 200, "latency_ms": 9.0, "ttft_ms": 3.0, "cache_hit": True,
             "prompt_tokens": 10, "reused_tokens": 5}]
    res = {"name": "r1", "config": {"replicas": 1, "affinity": "on"}, "modes": {"reuse_on": summarize(recs, 1.0)}}
    (tmp_path / "a.json").write_text(json.dumps(res))
    assert main(["--combine", str(tmp_path / "a.json"), "--out-dir", str(tmp_path), "--name", "cmp"]) == 0
    assert "| r1 | 1 | on | 1 / 1 |" in (tmp_path / "cmp.md").read_text()


def test_run_phases_against_a_fake_streaming_server():
    """The client path end to end on an in-memory SSE server: the references all complete
    before any follow-up is sent, records carry TTFT / tokens / hits, errors are counted."""
    import asyncio

    import httpx

    from benchmarks.sweep import run_phases

    log = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] and body["cache_salt"] == "s1" and body["temperature"] == 0.0
        log.append(body["prompt"])
        if body["prompt"] == "bad":
            return httpx.Response(503, json={"error": {"message": "busy"}})
        hit = body["prompt"].startswith("follow")
        events = [{"choices": [{"text": t}]} for t in ("a", "b", "c")]
        events.append({"choices": [{"text": "", "finish_reason": "length"}], "semshare": {"cache_hit": hit}})
        events.append({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3,
                                                "prompt_tokens_details": {"cached_tokens": 9 if hit else 0}}})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    phases = [[{"kind": "reference", "prompt": f"ref{i}"} for i in range(3)],
              [{"kind": "variant", "prompt": f"follow{i}"} for i in range(4)] + [{"kind": "variant", "prompt": "bad"}]]
    recs, wall = asyncio.run(run_phases("http://127.0.0.1:1", "m", phases, 4, 3, "s1", {}, 10,
                                        transport=httpx.MockTransport(handler)))
    assert wall > 0 and len(recs) == 8
    assert all(p.startswith("ref") for p in log[:3]) and not any(p.startswith("ref") for p in log[3:])
    s = sweep_report.summarize_level(recs, wall)
    assert s["ok"] == 7 and s["non_200"] == 1 and s["output_tokens"] == 21
    assert s["by_kind"]["reference"]["hit_rate"] == 0.0 and s["by_kind"]["variant"]["hit_rate"] == 1.0
    assert all(r["ttft_ms"] is not None and r["completion_tokens"] == 3 for r in recs if r["status"] == 200)
