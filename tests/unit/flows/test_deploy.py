"""The deployments `python -m flows.deploy` serves, built without a server: names that say what each does, and
train_and_deploy's Run form at params.yaml's values (renewed when the file changes), model.preset a choice."""

from __future__ import annotations

import shutil
import threading
import time

import jsonschema
import pytest
import yaml

from flows.deploy import DEPLOYMENTS, deployments, form_defaults, watch
from flows.finetune_and_deploy import FinetuneOverrides
from flows.overrides import ORIGINAL
from pipelines.common.params import _model_config_module
from tests.helpers.paths import REPO


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder holding the repository's params.yaml with some knobs changed, as the current directory."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["preset"] = "tiny"
    params["train"].update(max_steps=77, seed=5)
    params["eval"]["num_fewshot"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def by_flow(built: list) -> dict:
    return {d.flow_name: d for d in built}


def test_each_deployment_is_named_for_what_it_does(workspace):
    built = by_flow(deployments())
    assert {flow: d.name for flow, d in built.items()} == DEPLOYMENTS
    assert DEPLOYMENTS == {
        "train_and_deploy": "train-and-deploy",
        "finetune_and_deploy": "finetune-and-deploy",
        "evaluate_model": "evaluate-version",
        "promote_model": "promote-version",
        "serve_model": "serve-model",
    }


def test_the_run_form_shows_params_yaml_values_and_set_defaults(workspace):
    overrides = by_flow(deployments(defaults={"train.seed": 9, "serve.host": "0.0.0.0"}))["train_and_deploy"]
    assert overrides.parameters["overrides"] == {
        "tokenizer": {"vocab_size": 4096},
        "model": {"preset": "tiny"},
        "train": {"max_steps": 77, "checkpoint_every": 100, "val_every": 100, "seed": 9},
        "eval": {"num_fewshot": [0], "tasks": ["quill_cloze", "quill_nextline", "quill_perplexity"]},
        "finetune": {"method": "full", "max_steps": 200, "lr": 0.0005},
        "other": {"serve.host": "0.0.0.0"},
    }


def test_the_preset_is_a_choice_of_the_presets_and_the_schema_refuses_others(workspace):
    deployment = by_flow(deployments())["train_and_deploy"]
    schema = deployment._parameter_openapi_schema.model_dump(exclude_none=True)  # what the server gets
    preset = schema["definitions"]["ModelKnobs"]["properties"]["preset"]
    presets = list(_model_config_module().PRESETS)  # model/config.py's, read as params.py reads them
    assert preset["anyOf"][0]["enum"] == presets and "tiny" in presets and "124m" in presets
    jsonschema.validate(deployment.parameters, schema)  # the form's defaults pass the server's check
    with pytest.raises(jsonschema.ValidationError, match="huge"):
        jsonschema.validate({"overrides": {"model": {"preset": "huge"}}}, schema)


def test_the_finetune_form_offers_only_the_finetune_knobs_at_params_yaml_values(workspace):
    form = by_flow(deployments())["finetune_and_deploy"].parameters["overrides"]
    assert set(form) == {"finetune", "other"}
    assert form["finetune"] == {"method": "full", "max_steps": 200, "lr": 0.0005}  # params.yaml's finetune section
    with pytest.raises(ValueError, match="finetune.base changes only through params.yaml"):
        FinetuneOverrides.from_dotted({"finetune.base": "/somewhere/else"})


def test_the_form_shows_the_users_file_while_a_run_holds_its_overrides_in_it(workspace):
    ORIGINAL.parent.mkdir()
    shutil.copy("params.yaml", ORIGINAL)  # what flows/overrides.py's `overridden` keeps while a stage runs
    params = workspace / "params.yaml"
    params.write_text(params.read_text().replace("max_steps: 77", "max_steps: 3"))
    assert form_defaults()["train"]["max_steps"] == 77
    ORIGINAL.unlink()
    assert form_defaults()["train"]["max_steps"] == 3


def test_a_changed_params_yaml_renews_the_form_and_a_half_edited_one_keeps_it(workspace):
    pushed: list[dict] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=({}, pushed.append, 0.05, stop))
    watcher.start()
    try:
        time.sleep(0.3)
        assert pushed == []  # nothing changed
        text = (workspace / "params.yaml").read_text()
        (workspace / "params.yaml").write_text(text.replace("max_steps: 77", "max_stepz: 77"))  # not valid
        time.sleep(0.3)
        assert pushed == []
        (workspace / "params.yaml").write_text(text.replace("max_steps: 77", "max_steps: 78"))
        deadline = time.monotonic() + 10
        while not pushed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join()
    assert [p["train_and_deploy"]["train"]["max_steps"] for p in pushed] == [78]
