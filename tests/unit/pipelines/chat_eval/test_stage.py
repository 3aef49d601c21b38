"""pipelines/chat_eval/stage.py: the stage end to end on a tiny workspace (both models' numbers are theirs, the
contract's keys, the finetune run in MLflow), the base it picks, and its bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer

from model import GPT, load_pretrained
from model.chat import literal
from pipelines.chat_eval.models import base_spec
from pipelines.chat_eval.stage import chat_eval, main
from pipelines.common.chat_test import RESPONSE_SCORER, held_out_conversations, response_score
from pipelines.common.hashing import content_hash
from pipelines.common.layout import Layout
from pipelines.common.params import load_params
from pipelines.common.tracking import RUN_FILE
from pipelines.finetune.export import save_chat_model
from tests.helpers.chat import write_chats, write_params

EVAL = {"tasks": ["quill_cloze"], "num_fewshot": [0], "limit": 2, "max_items": 4, "batch_size": 8, "stride": 32}
CHAT_EVAL = {"max_conversations": 3, "max_tokens": 8, "samples": 2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, project) -> Path:
    """The tiny project (data/clean, a random base in artifacts/model), data/chat, and a chat model: other random
    weights with the base's tokenizer and the ChatML template, as the finetune stage exports it."""
    root = tmp_path_factory.mktemp("chat-eval")
    shutil.copytree(project / "data", root / "data")
    shutil.copytree(project / "artifacts", root / "artifacts")
    write_chats(root / "data/chat")
    base = load_pretrained(root / "artifacts/model")
    torch.manual_seed(1)
    save_chat_model(GPT(base.config), root / "artifacts/chat_model", root / "artifacts/model", root / "scratch")
    record = {"mlflow_run_id": "not-in-the-store", "base": {"spec": "artifacts/model", "run_id": None}}
    (root / "artifacts/chat_model" / RUN_FILE).write_text(json.dumps(record))
    write_params(root, eval=CHAT_EVAL)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "eval": EVAL}))
    return root


@pytest.fixture
def work(tmp_path, workspace) -> Path:
    shutil.copytree(workspace, tmp_path / "ws")
    return tmp_path / "ws"


def test_the_stage_scores_both_models_and_writes_the_contract(work, mlflow_uri):
    from mlflow import MlflowClient

    from pipelines.common.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = client.create_run(get_or_create_experiment(client), run_name="finetune-lora").info.run_id
    record = json.loads((work / "artifacts/chat_model" / RUN_FILE).read_text())
    (work / "artifacts/chat_model" / RUN_FILE).write_text(json.dumps({**record, "mlflow_run_id": run_id}))
    layout = Layout().under(work)

    metrics = chat_eval(load_params(layout.params), layout, tracking_uri=mlflow_uri)

    # each model's response bpb is its own, scored through the chat model's tokenizer
    conversations = held_out_conversations(layout.chat / "test.jsonl", CHAT_EVAL["max_conversations"])
    tokenizer = literal(Tokenizer.from_file(str(layout.chat_model / "tokenizer.json")))
    for key, folder in (("response_bpb", layout.chat_model), ("base_response_bpb", layout.model)):
        expected = response_score(load_pretrained(folder).float(), tokenizer, conversations, batch_size=1)
        assert metrics[key] == pytest.approx(expected.bpb, rel=1e-5)
    assert metrics["response_bpb"] != pytest.approx(metrics["base_response_bpb"])
    assert metrics["response_bpb_gain"] == pytest.approx(metrics["base_response_bpb"] - metrics["response_bpb"])
    assert metrics["conversations"] == 3 and metrics["response_bytes"] == expected.bytes
    assert 0 <= metrics["eot_rate"] <= 1 and 0 <= metrics["base_eot_rate"] <= 1
    assert set(metrics["tasks"]) == {"chat", "base"}
    assert set(metrics["tasks"]["chat"]["quill_cloze"]["0shot"]) == {"acc", "perplexity"}
    assert json.loads(layout.chat_eval_metrics.read_text()) == metrics

    evaluated = json.loads(layout.chat_evaluated.read_text())
    assert evaluated == {
        "model_sha256": content_hash(layout.chat_model / "model.safetensors"),
        "base": "artifacts/model",
        "base_model_sha256": content_hash(layout.model / "model.safetensors"),
        "test_data_sha256": content_hash(layout.chat / "test.jsonl"),
        "tokenizer_sha256": evaluated["tokenizer_sha256"],
        "mlflow_run_id": run_id,
        "temperature": 0.7,
        "max_tokens": 8,
        "response_scorer": RESPONSE_SCORER,
    }
    samples = json.loads(layout.chat_samples.read_text())
    assert len(samples) == 2 and samples[0]["reference"] == conversations[0][-1]["content"]
    report = (layout.chat_eval_reports / "report.md").read_text()
    assert "| response bits per byte" in report and "| quill_cloze | 0 | acc |" in report

    run = client.get_run(run_id)  # the finetune run named by quill_run.json
    assert run.data.metrics["chat_eval.response_bpb"] == pytest.approx(metrics["response_bpb"])
    assert "chat_eval.tasks.base.quill_cloze.0shot.acc" in run.data.metrics
    assert run.data.tags["quill.chat_evaluated"] == "true"


def test_a_registry_base_is_read_at_the_version_fine_tuned_from(tmp_path):
    (tmp_path / RUN_FILE).write_text(
        json.dumps({"base": {"spec": "models:/quill-gpt@champion", "model_name": "quill-gpt", "version": "3"}})
    )
    assert base_spec(tmp_path, "artifacts/model") == ("models:/quill-gpt@champion", "models:/quill-gpt/3")
    assert base_spec(tmp_path / "elsewhere", "/models/base") == ("/models/base", "/models/base")  # no record


def no_chat_model(root: Path) -> None:
    shutil.rmtree(root / "artifacts/chat_model")


def no_chat_template(root: Path) -> None:
    config = root / "artifacts/chat_model/tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))


def no_test_split(root: Path) -> None:
    (root / "data/chat/test.jsonl").unlink()


def empty_test_split(root: Path) -> None:
    (root / "data/chat/test.jsonl").write_text("")


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (no_chat_model, "no chat model in"),
        (no_chat_template, "has no chat_template"),
        (no_test_split, "test.jsonl not found"),
        (empty_test_split, "holds no conversation"),
    ],
)
def test_bad_inputs_stop_the_stage_in_one_line_naming_the_fix(work, spoil, says, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")  # --root would set it for good
    spoil(work)
    assert main(["--root", str(work)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("chat_eval: error: ") and says in line and "dvc repro" in line
    assert not (work / "metrics/chat_eval.json").exists()


def test_the_bases_task_scores_come_from_evaluate_only_for_the_same_weights_and_shots(tmp_path):
    from pipelines.chat_eval.stage import evaluated_tasks
    from pipelines.common.layout import PROJECT
    from pipelines.common.params import EvalParams

    layout = PROJECT.under(tmp_path)
    params = EvalParams(tasks=["quill_cloze"], num_fewshot=[0, 2])
    assert evaluated_tasks(layout, params, "sha256:base") is None  # nothing evaluated yet
    layout.eval_metrics.parent.mkdir(parents=True)
    layout.evaluated.parent.mkdir(parents=True)
    scores = {"0shot": {"acc": 0.25}, "2shot": {"acc": 0.5}}
    layout.eval_metrics.write_text(json.dumps({"quill_cloze": scores, "num_fewshot": "0,2"}))
    layout.evaluated.write_text(json.dumps({"model_sha256": "sha256:base"}))
    assert evaluated_tasks(layout, params, "sha256:base") == {"quill_cloze": scores}
    assert evaluated_tasks(layout, params, "sha256:other-weights") is None
    assert evaluated_tasks(layout, EvalParams(tasks=["quill_cloze"], num_fewshot=[0]), "sha256:base") is None
    assert evaluated_tasks(layout, EvalParams(tasks=["quill_nextline"], num_fewshot=[0, 2]), "sha256:base") is None
