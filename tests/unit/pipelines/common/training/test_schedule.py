"""pipelines/common/training/schedule.py: the learning-rate schedule and AdamW's parameter groups."""

from __future__ import annotations

import pytest

from model import GPT, GPTConfig
from pipelines.common.training.schedule import lr_at, param_groups


def test_lr_schedule_at_key_steps():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # first warmup step: lr / warmup_steps
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # halfway: the midpoint of lr and min_lr
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # past the end: the floor
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1e-3)  # no warmup


def test_weight_decay_skips_norms_and_embeddings():
    for tie in (True, False):
        model = GPT(GPTConfig.from_preset("tiny", tie_embeddings=tie))
        decay, rest = param_groups(model, 0.1)
        assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
        decayed = {id(p) for p in decay["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in decayed}
        assert not any("norm" in n or "embed_tokens" in n for n in names)
        assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)
        assert ("lm_head.weight" in names) == (not tie)  # an untied head is a linear layer
        assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
