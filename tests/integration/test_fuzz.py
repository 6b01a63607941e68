"""Schema-driven fuzzing of the HTTP API (schemathesis, from the app's own OpenAPI).

Bounded: ``MAX_EXAMPLES`` generated cases per operation (plus schemathesis' explicit
examples / coverage cases), loopback only, against the session app (open mode,
tenant ``fuzz``). Every answer must be < 500, and every error a JSON error body.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

pytestmark = pytest.mark.ray
MAX_EXAMPLES = 30
CALLS: dict[str, int] = {}


def _schema():
    from serve_app.ingress import app  # the routes are registered at import; no Ray needed

    return schemathesis.openapi.from_dict(app.openapi())


schema = _schema()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_api_never_5xx_and_errors_are_json(case, server):
    resp = case.call(base_url=server.base, headers={"X-Tenant": "fuzz"}, timeout=60)
    key = f"{case.method} {case.path}"
    CALLS[key] = CALLS.get(key, 0) + 1
    assert resp.status_code < 500, (case.method, case.path, case.body, resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        ctype = resp.headers.get("content-type") or [""]
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert ctype.startswith("application/json"), resp.headers
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]


def test_fuzz_report():
    print(f"\nfuzz: {sum(CALLS.values())} calls: {dict(sorted(CALLS.items()))}")
