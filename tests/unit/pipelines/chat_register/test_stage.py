"""chat_register: the chat model is its own registered model, with a champion gate on held-out response bits per
byte, a model card and lineage tags naming the base's version and the chat data; against a real SQLite store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.common.hashing import content_hash
from pipelines.common.layout import PROJECT
from pipelines.common.params import load_params
from tests.helpers.chat import llama_folder, write_chats, write_params

NAME = "quill-test-chat"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("chat") / "chat_model")


@pytest.fixture
def project(tmp_path, chat_model, mlflow_uri, monkeypatch) -> Path:
    """A project whose finetune and chat_eval stages have run (their outputs written as they write them)."""
    from pipelines.common import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    write_params(tmp_path)
    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params + f"registry:\n  chat_model_name: {NAME}\n  min_improvement: 0.05\n")
    write_chats(tmp_path / PROJECT.chat)
    shutil.copytree(chat_model, tmp_path / PROJECT.chat_model)
    client = tracking.mlflow_client()
    experiment = tracking.get_or_create_experiment(client)
    base_tags = {"quill.base_model_name": "quill-test", "quill.base_model_version": "3", "quill.base_run_id": "r0"}
    finetune_run = client.create_run(experiment, run_name="finetune-lora", tags=base_tags).info.run_id
    (tmp_path / PROJECT.chat_model / "quill_run.json").write_text(json.dumps({"mlflow_run_id": finetune_run}))
    return tmp_path


def write_chat_eval(response_bpb: float, test_data: str | None = None, model_sha: str | None = None) -> None:
    """metrics/chat_eval.json and evaluated.json as the chat_eval stage writes them (numbers chosen by the test)."""
    run_id = json.loads((PROJECT.chat_model / "quill_run.json").read_text())["mlflow_run_id"]
    metrics = {
        "response_bpb": response_bpb,
        "eot_rate": 0.95,
        "base_response_bpb": 4.0,
        "base_eot_rate": 0.0,
        "response_bpb_gain": 4.0 - response_bpb,
        "conversations": 4,
        "response_bytes": 300,
        "tasks": {"chat": {"quill_cloze": {"0shot": {"acc": 0.2}}}, "base": {"quill_cloze": {"0shot": {"acc": 0.3}}}},
    }
    identity = {
        "model_sha256": model_sha or content_hash(PROJECT.chat_model / "model.safetensors"),
        "base": "artifacts/model",
        "base_model_sha256": "sha256:base",
        "test_data_sha256": test_data or content_hash(PROJECT.chat / "test.jsonl"),
        "tokenizer_sha256": "sha256:tok",
        "temperature": 0.7,
        "max_tokens": 64,
        "mlflow_run_id": run_id,
    }
    PROJECT.chat_eval_reports.mkdir(parents=True, exist_ok=True)
    PROJECT.chat_evaluated.write_text(json.dumps(identity))
    PROJECT.chat_samples.write_text(
        json.dumps([{"prompt": "Hail!", "chat": "Well met.", "base": "the the", "reference": "Hi."}])
    )
    PROJECT.chat_eval_metrics.parent.mkdir(exist_ok=True)
    PROJECT.chat_eval_metrics.write_text(json.dumps(metrics))


def test_the_gate_is_response_bpb_and_the_version_names_its_lineage(project):
    from pipelines.chat_register.stage import chat_register
    from pipelines.common.tracking import mlflow_client

    params = load_params("params.yaml")
    write_chat_eval(2.0)
    first = chat_register(params)
    assert first["model_name"] == NAME and first["aliases"] == ["champion"] and "first model" in first["why"]
    assert json.loads(PROJECT.chat_registered.read_text()) == first
    v1 = mlflow_client().get_model_version(NAME, "1")
    assert v1.tags["base_model_name"] == "quill-test" and v1.tags["base_model_version"] == "3"
    assert v1.tags["response_bpb"] == "2" and v1.tags["eot_rate"] == "0.95" and "dvc_hash.data/chat" in v1.tags
    assert v1.description.startswith(f"# {NAME} v1") and "quill-test v3 fine-tuned" in v1.description
    assert "| base | 4 | 0 |" in v1.description and "Well met." in v1.description

    write_chat_eval(1.98)  # better, but by less than registry.min_improvement
    second = chat_register(params)
    assert (
        second["version"] == "2"
        and second["aliases"] == ["challenger"]
        and "< registry.min_improvement" in second["why"]
    )
    write_chat_eval(1.5)
    third = chat_register(params)
    assert third["aliases"] == ["champion"] and third["champion_response_bpb"] == pytest.approx(2.0)
    assert chat_register(params) == third  # the same evaluation again: its version, not a new one


def test_a_champion_scored_on_other_conversations_is_scored_again_on_these(project):
    from pipelines.chat_register.stage import chat_register

    params = load_params("params.yaml")
    write_chat_eval(2.0, test_data="sha256:older-conversations")
    chat_register(params)
    write_chat_eval(2.5)  # the same weights: only a champion scored on the current conversations compares
    second = chat_register(params)
    assert "re-evaluated on the current test split" in second["why"] and "conversations changed" in second["why"]
    rescored = second["champion_response_bpb"]
    assert rescored != pytest.approx(2.0) and 3.0 < rescored < 20.0  # an untrained model's bits per byte


def test_an_evaluation_of_another_model_registers_nothing(project, capsys):
    from pipelines.chat_register.stage import main
    from pipelines.common.tracking import mlflow_client

    assert main([]) == 1 and "metrics/chat_eval.json missing" in capsys.readouterr().err
    write_chat_eval(2.0, model_sha="sha256:another")
    assert main([]) == 1 and "describes another model" in capsys.readouterr().err
    assert mlflow_client().search_registered_models() == [] and not PROJECT.chat_registered.exists()
