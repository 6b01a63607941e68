"""Every string the HTTP API accepts must be valid Unicode (docs: no route takes a lone surrogate)."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_app.schemas import ChatCompletionRequest, CompletionRequest

BAD = '"a\\ud800b"'
MSG = '[{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("model,body", [
    (CompletionRequest, '{"prompt": "hi", "user": %s}' % BAD),
    (ChatCompletionRequest, '{"messages": %s, "user": %s}' % (MSG, BAD)),
    (CompletionRequest, '{"prompt": "hi", "model": %s}' % BAD),
    (ChatCompletionRequest, '{"messages": %s, "model": %s}' % (MSG, BAD)),
])
def test_openai_string_fields_refuse_lone_surrogates(model, body):
    with pytest.raises(ValidationError, match="lone surrogate"):
        model.model_validate(json.loads(body))  # the ingress parses with json.loads (surrogates survive)


def test_valid_user_and_model_still_accepted():
    r = CompletionRequest.model_validate_json('{"prompt": "hi", "user": "u-\\u00e9", "model": "m"}')
    assert r.user == "u-é" and r.model == "m"
