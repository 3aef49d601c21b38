"""The evaluate project's model (tests/unit/conftest.py's `project`) as an engine: the held-out metric, the lm-eval
adapter and the task pack score with it. `pool_for_tiny_steps`: the data engine's pool runs a test's tiny steps."""

from __future__ import annotations

import pytest

from model import Engine
from pipelines.common import engine as data_engine


@pytest.fixture(scope="module")
def engine(project) -> Engine:
    return Engine.from_pretrained(project / "artifacts/model")


@pytest.fixture
def pool_for_tiny_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of a few KB go to the process pool too (a real corpus's size), not to the stage's own process."""
    monkeypatch.setattr(data_engine, "INLINE_BYTES", 0)
