"""Flow parameters are read as params.yaml reads them: `1e-3` is a float, in the file and in an override."""

from __future__ import annotations

import shutil

import pytest

from flows.overrides import check
from pipelines.common.params import ParamsError, read_yaml
from tests.helpers.paths import REPO


def test_overrides_on_a_params_file_with_exponent_floats(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    params.write_text(params.read_text().replace("lr: 0.004", "lr: 4e-3"))
    assert check({"train.min_lr": read_yaml("1e-4")}, params).train.lr == pytest.approx(4e-3)
    assert check({"train.min_lr": read_yaml("1e-4")}, params).train.min_lr == pytest.approx(1e-4)
    with pytest.raises(ParamsError, match="train.max_steps"):
        check({"train.max_steps": read_yaml('"100"')}, params)
