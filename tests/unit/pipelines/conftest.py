"""The evaluate project's model (tests/unit/conftest.py's `project`) as an engine: the held-out metric, the lm-eval
adapter and the task pack score with it."""

from __future__ import annotations

import pytest

from model import Engine


@pytest.fixture(scope="module")
def engine(project) -> Engine:
    return Engine.from_pretrained(project / "artifacts/model")
