"""The HTTP RAG benchmark's pure parts: greedy prefix agreement, the summary and the table."""
from __future__ import annotations

from benchmarks import rag_http


def _row(prompt, kind="rag", hit=True, speed=2.0, first=True, prefix=1.0, correct=False, stale=False):
    return {"prompt": prompt, "length": 2048, "sources": 3, "kind": kind, "n_tokens": 2000, "hit": hit,
            "sources_used": 3 if hit else 0, "reused_share": 0.8 if hit else 0.0, "full_ttft_ms": 1000.0,
            "multi_ttft_ms": 1000.0 / speed, "speedup_server": speed, "speedup_client": speed * 0.9,
            "first_same": first, "prefix_share": prefix, "fact_correct": correct, "fact_stale": stale,
            "fact_full_correct": kind == "fact"}


def test_common_prefix():
    assert rag_http.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert rag_http.common_prefix([], [1]) == 0
    assert rag_http.common_prefix([5, 6], [5, 6, 7]) == 2


def test_summary_counts_rag_and_fact_prompts_apart():
    rows = [_row(0, speed=2.0), _row(1, speed=3.0, first=False, prefix=0.25),
            _row(2, kind="fact", speed=2.5, first=False, correct=True), _row(3, kind="fact", hit=False, speed=1.0,
                                                                            stale=True)]
    s = rag_http.summarize(rows)
    assert s["prompts"] == 4 and s["hits"] == 3
    assert s["speedup_server_median"] == 2.25 and s["speedup_server_range"] == [1.0, 3.0]
    assert s["first_token_same"] == "1/2"          # fact prompts are judged by their code, not their first token
    assert s["greedy_prefix_median"] == 0.625
    assert s["facts_correct"] == "1/2" and s["facts_stale"] == "1/2" and s["facts_full_correct"] == "2/2"


def test_markdown_has_one_line_per_group_and_prompt():
    rows = [_row(0), _row(1, kind="fact", correct=True)]
    res = {"name": "t", "url": "u", "model": "m", "seed": 0, "cached": 8, "conditions": "c",
           "groups": [{"length": 2048, "sources": 3, "summary": rag_http.summarize(rows)}],
           "summary": rag_http.summarize(rows), "rows": rows}
    md = rag_http.markdown(res)
    assert md.count("\n| 2048 | 3 |") == 1           # the group line
    assert md.count("\n| 0 | 2048 |") == 1 and md.count("\n| 1 | 2048 |") == 1
