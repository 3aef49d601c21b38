"""flows/overrides.py: a run's overrides, read from --set, checked over params.yaml, and what no run may override."""

from __future__ import annotations

import shutil

import pytest
from pydantic import ValidationError

from flows import deploy, train_and_deploy
from flows.overrides import Overrides, check, parse_sets
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


def test_set_items_are_read_as_yaml_and_need_an_equals_sign():
    assert parse_sets(["train.lr=1e-3", "serve.host = 0.0.0.0", "eval.tasks=[a, b]"]) == {
        "train.lr": 1e-3,
        "serve.host": "0.0.0.0",
        "eval.tasks": ["a", "b"],
    }
    with pytest.raises(ValueError, match="--set train.max_steps: expected KEY=VALUE"):
        parse_sets(["train.max_steps"])


@pytest.mark.parametrize("main", [deploy.main, train_and_deploy.main])
def test_both_command_lines_refuse_a_set_without_a_value_before_any_work(main, capsys):
    """flows.deploy took `--set train.max_steps` as the key with an empty value; both refuse it now (exit 2)."""
    try:
        code = main(["--set", "train.max_steps"])
    except SystemExit as exc:  # argparse's error exit
        code = exc.code
    assert code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key",
    ["data.sources", "data", "registry.force_promote", "registry.min_improvement", "registry", "finetune.sources"],
)
def test_where_data_comes_from_and_the_promotion_policy_are_refused_as_overrides(key):
    """Only a reviewed params.yaml in git changes them: the Run form's model, the API and --set refuse them."""
    with pytest.raises(ParamsError, match=f"override '{key}'.*only through params.yaml in git"):
        parse_sets([f"{key}=true"])
    with pytest.raises(ValidationError, match="only through params.yaml in git"):
        Overrides(other={key: True})
    assert "registry" not in Overrides.model_fields  # the form offers no promotion knob
    assert Overrides(other={"data.split.val": 0.1, "serve.port": 8001}).dotted() == {
        "data.split.val": 0.1,
        "serve.port": 8001,
    }
