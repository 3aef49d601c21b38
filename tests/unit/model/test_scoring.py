"""Rolling (held-out) scoring (model/scoring.py): the sliding windows score every token once with bounded context,
and the batched rolling log-likelihood equals the token-by-token computation on the evaluate project's model."""

from __future__ import annotations

import pytest

from model import Engine
from model.scoring import rolling_loglikelihood, rolling_windows
from tests.helpers.evaluation import held_out_docs, naive_loglik


# -- sliding windows -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block_size,stride", [(1, 4, 2), (4, 4, 4), (5, 4, 4), (10, 4, 2), (10, 4, 1), (100, 16, 5)])
def test_every_token_scored_once_with_bounded_context(n, block_size, stride):
    scored = []
    for start, end, n_scored in rolling_windows(n, block_size, stride):
        assert 0 <= start < end and end - start <= block_size and 1 <= n_scored <= end - start
        scored += list(range(end - n_scored, end))  # target t[i] is predicted at x position i
    assert scored == list(range(n))


# the evaluate project's model (tests/unit/conftest.py's `project`), not model/conftest.py's random one: the
# held-out documents are in its tokens
@pytest.fixture(scope="module")
def engine(project) -> Engine:
    return Engine.from_pretrained(project / "artifacts/model")


@pytest.mark.parametrize("stride", [64, 24, 7])
def test_rolling_loglikelihood_equals_token_by_token_computation(engine, project, stride):
    docs = [d[:150] for d in held_out_docs(project)[:2]]
    got = rolling_loglikelihood(engine.model, docs, 0, stride=stride, batch_size=3)
    want = [naive_loglik(engine.model, d, 0, stride) for d in docs]
    assert got == pytest.approx(want, rel=1e-5)
