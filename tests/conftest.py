"""Session-wide fixtures: the real models, loaded once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    from saelab.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="session")
def smollm():
    from saelab.models import load_model

    return load_model("smollm2-135m")
