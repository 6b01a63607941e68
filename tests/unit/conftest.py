from __future__ import annotations

import pytest

from .tiny import tiny_engine


@pytest.fixture(params=["llama", "mistral"])
def engine(request):
    return tiny_engine(request.param)
