"""pipelines/common/training/trainer.py: precision and strategy from train.* and the hardware."""

from __future__ import annotations

import pytest

from pipelines.common.training.trainer import resolve_precision, resolve_strategy


@pytest.mark.parametrize(
    "precision, cuda, bf16, expected",
    [
        ("auto", False, False, "32-true"),
        ("auto", True, True, "bf16-mixed"),
        ("auto", True, False, "32-true"),
        ("32", True, True, "32-true"),
        ("bf16-mixed", False, False, "bf16-mixed"),
        ("16-mixed", True, False, "16-mixed"),
    ],
)
def test_precision_resolution(precision, cuda, bf16, expected):
    assert resolve_precision(precision, cuda, bf16) == expected


def test_strategy_resolution():
    from pytorch_lightning.strategies import FSDPStrategy

    from model.transformer import Block

    assert resolve_strategy("auto") == "auto"
    assert resolve_strategy("ddp") == "ddp"
    fsdp = resolve_strategy("fsdp")
    assert isinstance(fsdp, FSDPStrategy)
    assert fsdp._state_dict_type == "full"
    assert Block in fsdp.kwargs["auto_wrap_policy"]._module_classes
