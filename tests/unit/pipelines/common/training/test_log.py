"""pipelines/common/training/log.py: bits per byte from the loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.common.training.log import bits_per_byte
from pipelines.train.data import TokenData


def test_bits_per_byte_formula():
    # 1 nat/token at 2 bytes per text token = 1 / ln 2 / 2 bits per byte
    assert bits_per_byte(1.0, 2.0) == pytest.approx(1 / math.log(2) / 2)
    data = TokenData(Path("."), {"splits": {"val": {"tokens": 110, "docs": 10, "bytes": 300}}})
    assert data.bytes_per_text_token("val") == pytest.approx(3.0)  # EOT tokens carry no bytes
