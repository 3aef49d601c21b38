"""pipelines/train/log.py: the train stage's step progress, a bar only on a terminal."""

from __future__ import annotations


def test_the_train_stage_draws_a_bar_only_on_a_terminal(monkeypatch):
    from pipelines.train import log

    assert isinstance(log.step_progress(), log.StepLines)
    monkeypatch.setattr(log, "on_terminal", lambda: True)
    assert isinstance(log.step_progress(), log.StepProgressBar)
