"""pipelines/train/stage.py: the train stage on tiny shards, resumed, interrupted, refused; its dvc.yaml entry."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from model import load_pretrained
from pipelines.common.layout import Layout
from pipelines.common.params import TrainParams, parse_params
from pipelines.common.training import checkpoints as ckpt
from pipelines.common.training.resume import stored_runs
from pipelines.train.lit_gpt import LitGPT
from pipelines.train.stage import TrainError, total_steps, train
from tests.helpers.paths import REPO
from tests.helpers.projects import TINY_TRAIN, build_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("shards"))


def make_params(**train):
    return parse_params(
        {
            "data": {"sources": [{"type": "local", "path": "corpus"}]},
            "model": {"preset": "tiny"},
            "train": {**TINY_TRAIN, **train},
        }
    )


@pytest.fixture
def work(tmp_path: Path, shards: Path, mlflow_uri: str) -> tuple[Layout, str]:
    """The layout of one run (inputs are copies, outputs in tmp_path) and a fresh MLflow store."""
    shutil.copytree(shards / "tokens", tmp_path / "data" / "tokens")
    shutil.copytree(shards / "tokenizer", tmp_path / "data" / "tokenizer")
    return Layout().under(tmp_path), mlflow_uri


def test_token_budget_caps_the_steps():
    assert total_steps(TrainParams(max_steps=100), 1000) == 100
    assert total_steps(TrainParams(max_steps=100, max_tokens=25_500), 1000) == 26  # ceil
    assert total_steps(TrainParams(max_steps=10, max_tokens=10**9), 1000) == 10


def test_fast_dev_run_trains_one_step_and_writes_nothing(work):
    paths, uri = work
    metrics = train(make_params(), paths, fast_dev_run=True, tracking_uri=uri)
    assert metrics["steps"] == 1 and math.isfinite(metrics["train_loss"]) and metrics["mfu"] is None
    assert not paths.checkpoints.exists() and not paths.model.exists() and not paths.train_metrics.exists()


def test_training_lowers_the_loss_and_fills_the_mlflow_run(work):
    from mlflow import MlflowClient

    paths, uri = work
    metrics = train(make_params(max_steps=40, val_every=20, checkpoint_every=20), paths, tracking_uri=uri)

    # metrics/train.json: the documented keys, and learning happened
    saved = json.loads(paths.train_metrics.read_text())
    assert set(saved) == {
        "steps",
        "tokens_seen",
        "train_loss",
        "val_loss",
        "val_bpb",
        "tokens_per_s",
        "mfu",
        "params",
        "resumed_from_step",
    }
    assert saved == pytest.approx(metrics)
    assert saved["steps"] == 40 and saved["tokens_seen"] == 40 * 4 * 64 and saved["resumed_from_step"] == 0
    assert saved["mfu"] is None and saved["tokens_per_s"] > 0
    rows = list(csv_rows(paths.train_plots / "train.csv"))
    first_loss = float(rows[0]["train_loss"])
    assert abs(first_loss - math.log(512)) < 0.5  # starts near uniform over the vocabulary
    assert saved["train_loss"] < first_loss - 0.8 and saved["val_loss"] < math.log(512) - 0.8
    meta = json.loads((paths.tokens / "meta.json").read_text())["splits"]["val"]
    expected_bpb = saved["val_loss"] / math.log(2) * (meta["tokens"] - meta["docs"]) / meta["bytes"]
    assert saved["val_bpb"] == pytest.approx(expected_bpb)

    # curves for dvc plots, checkpoints, and the model folder
    assert [int(r["step"]) for r in rows] == list(range(2, 41, 2))
    assert [int(r["step"]) for r in csv_rows(paths.train_plots / "val.csv")] == [20, 40]
    assert (paths.train_plots / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir(paths))] == [40, 20]
    model = load_pretrained(paths.model)
    assert model.config.vocab_size == 512 and model.config.n_layer == 2
    run_file = json.loads((paths.model / "quill_run.json").read_text())
    assert run_file["mlflow_tracking_uri"] == uri and run_file["steps"] == 40

    # the MLflow run, read back from the store
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_file["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.max_steps"] == "40" and p["train.lr"] == "0.003" and p["model.n_layer"] == "2"
    assert p["tokenizer_sha256"] == meta_sha(paths) and p["dvc.tokens"].startswith("sha256:")
    assert p["dvc.tokenizer"].startswith("sha256:") and "git_commit" in p and p["precision_resolved"] == "32-true"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(2, 41, 2))
    assert history[-1].value == pytest.approx(saved["train_loss"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_bpb")] == [20, 40]
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 20
    assert run.data.metrics["final_val_bpb"] == pytest.approx(saved["val_bpb"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "model/quill_run.json"} <= artifacts
    assert {f.path for f in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/loss.png", "plots/train.csv"}

    # running again with nothing changed re-exports from the final checkpoint without training
    again = train(make_params(max_steps=40, val_every=20, checkpoint_every=20), paths, tracking_uri=uri)
    assert again["resumed_from_step"] == 40 and again["val_loss"] == pytest.approx(saved["val_loss"])
    assert json.loads((paths.model / "quill_run.json").read_text())["mlflow_run_id"] == run.info.run_id


def run_dir(paths: Layout) -> Path:
    """The one configuration folder under checkpoints/."""
    [folder] = [p for p in paths.checkpoints.iterdir() if p.is_dir()]
    return folder


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def meta_sha(paths: Layout) -> str:
    return json.loads((paths.tokens / "meta.json").read_text())["tokenizer_sha256"]


def test_resume_from_a_torn_checkpoint_falls_back_and_matches(work):
    paths, uri = work
    train(make_params(), paths, tracking_uri=uri)
    reference = load_pretrained(paths.model).state_dict()
    newest = ckpt.list_checkpoints(run_dir(paths))[0][1]  # step 16
    shutil.rmtree(paths.model)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        metrics = train(make_params(), paths, tracking_uri=uri)
    assert metrics["resumed_from_step"] == 12 and metrics["steps"] == 16
    resumed = load_pretrained(paths.model).state_dict()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def interrupt(paths: Layout, at: int) -> Path:
    """Make the finished run under checkpoints/ look killed after step `at`: drop its newer checkpoints."""
    folder = run_dir(paths)
    for step, path in ckpt.list_checkpoints(folder):
        if step > at:
            path.unlink()
    return folder


def mlflow_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name("quill").experiment_id], order_by=["start_time ASC"])


def with_model(**model):
    return parse_params(
        {
            "data": {"sources": [{"type": "local", "path": "c"}]},
            "model": {"preset": "tiny", **model},
            "train": {**TINY_TRAIN, "max_steps": 4},
        }
    )


def test_a_finished_run_never_blocks_another_configuration(work, capsys):
    """After `make run`, `dvc exp run -S model.n_embd=96` or a new tokenizer trains (it stopped with 'delete
    checkpoints/' before)."""
    paths, uri = work
    train(make_params(max_steps=4), paths, tracking_uri=uri)
    finished = run_dir(paths)
    metrics = train(with_model(n_layer=3), paths, tracking_uri=uri)
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 4
    assert load_pretrained(paths.model).config.n_layer == 3
    assert not finished.exists() and f"removed {finished}/: a finished run" in capsys.readouterr().err
    meta = json.loads((paths.tokens / "meta.json").read_text())
    meta["tokenizer_sha256"] = "f" * 64  # what `-S tokenizer.vocab_size=8192` changes
    (paths.tokens / "meta.json").write_text(json.dumps(meta))
    assert train(with_model(n_layer=3), paths, tracking_uri=uri)["resumed_from_step"] == 0
    runs = mlflow_runs(uri)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert [r.data.params["model.n_layer"] for r in runs] == ["2", "3", "3"]


def test_an_interrupted_run_of_another_configuration_is_kept_and_resumes_later(work, capsys):
    paths, uri = work
    train(make_params(), paths, tracking_uri=uri)  # 16 steps, checkpoints every 4
    interrupted = interrupt(paths, at=12)
    first_run = mlflow_runs(uri)[0].info.run_id
    capsys.readouterr()
    assert train(with_model(n_embd=32), paths, tracking_uri=uri)["resumed_from_step"] == 0
    err = capsys.readouterr().err
    assert f"kept {interrupted}/: an interrupted run (step 12 of 16) of another configuration" in err
    assert "model.n_embd changed from 64 to 32" in err and "it resumes when its params are restored" in err
    assert [s for s, _ in ckpt.list_checkpoints(interrupted)] == [12]
    assert len([p for p in paths.checkpoints.iterdir() if p.is_dir()]) == 2

    metrics = train(make_params(), paths, tracking_uri=uri)  # the old params again: it resumes
    assert metrics["resumed_from_step"] == 12 and metrics["steps"] == 16
    assert json.loads((paths.model / "quill_run.json").read_text())["mlflow_run_id"] == first_run


def test_changing_max_steps_starts_a_new_run_instead_of_reshaping_the_schedule(work, capsys):
    """The cosine schedule is laid out over max_steps: resuming under another value would change the learning
    rate of every later step while the MLflow run kept the old train.max_steps."""
    paths, uri = work
    train(make_params(), paths, tracking_uri=uri)
    interrupted = interrupt(paths, at=12)
    capsys.readouterr()
    metrics = train(make_params(max_steps=24), paths, tracking_uri=uri)
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 24
    assert "train.max_steps changed from 16 to 24" in capsys.readouterr().err and interrupted.is_dir()
    runs = mlflow_runs(uri)
    assert [r.data.params["train.max_steps"] for r in runs] == ["16", "24"]
    assert runs[1].data.params["total_steps"] == "24"
    lr = {int(r["step"]): float(r["lr"]) for r in csv_rows(paths.train_plots / "train.csv")}
    assert lr[16] > 2 * 3e-4 and lr[24] < 1.1 * 3e-4  # the floor (min_lr) comes at the new last step, not at 16


def test_resume_checks_the_token_shards_themselves(work):
    """Shards rewritten with the same meta.json (same sizes, counts, tokenizer) are another configuration."""
    paths, uri = work
    train(make_params(max_steps=4), paths, tracking_uri=uri)
    assert train(make_params(max_steps=4), paths, tracking_uri=uri)["resumed_from_step"] == 4  # re-export
    tokens = np.fromfile(paths.tokens / "train.bin", dtype=np.uint16)
    np.roll(tokens, 1).tofile(paths.tokens / "train.bin")
    metrics = train(make_params(max_steps=4), paths, tracking_uri=uri)
    assert metrics["resumed_from_step"] == 0
    assert [run.step for run in stored_runs(paths.checkpoints)] == [4]  # the new one; the finished old one removed


def test_checkpoints_of_the_earlier_flat_layout_are_kept_and_named(work, capsys):
    paths, uri = work
    paths.checkpoints.mkdir()
    ckpt.save({"global_step": 8, "w": torch.zeros(2)}, ckpt.checkpoint_path(paths.checkpoints, 8))
    assert train(make_params(max_steps=4), paths, tracking_uri=uri)["resumed_from_step"] == 0
    assert "ignored 1 checkpoint(s) directly in" in capsys.readouterr().err
    assert ckpt.checkpoint_path(paths.checkpoints, 8).is_file()


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-each-step", "deferred-as-on-gpu"])
def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(work, monkeypatch, deferred):
    from mlflow import MlflowClient

    paths, uri = work
    monkeypatch.setattr(LitGPT, "defer_finite_check", deferred)
    original = LitGPT.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step == 6:
            self.model.lm_head.weight.data[0, 0] = float("nan")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LitGPT, "training_step", poisoned)
    with pytest.raises(
        TrainError, match=r"loss is not finite \(nan\) at step 6.*last good checkpoint kept: .*step-00000004\.ckpt"
    ):
        train(make_params(), paths, tracking_uri=uri)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir(paths))] == [4]
    assert not paths.model.exists()
    assert not [bar for bar in tqdm._instances if bar.desc.startswith("train")]  # closed, not reprinted at exit
    run = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("quill").experiment_id]
    )[0]
    assert run.info.status == "FAILED"


def test_missing_shards_and_bad_keys_fail_in_one_line(tmp_path, capsys):
    from pipelines.train.stage import main

    (tmp_path / "params.yaml").write_text("data:\n  sources: [{type: local, path: x}]\nmodel: {preset: tiny}\n")
    assert main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run dvc repro tokenize first" in err and "Traceback" not in err
    (tmp_path / "params.yaml").write_text("data:\n  sources: [{type: local, path: x}]\ntrain: {max_step: 3}\n")
    assert main(["--root", str(tmp_path)]) == 1
    assert "unknown key 'train.max_step' (did you mean 'max_steps'?)" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_runs_and_matches_eager_closely(work):
    paths, uri = work
    eager = train(make_params(max_steps=4), paths, fast_dev_run=True, tracking_uri=uri)
    compiled = train(make_params(max_steps=4, compile=True), paths, fast_dev_run=True, tracking_uri=uri)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-4)


def test_dvc_stage_lists_exactly_the_train_keys():
    import yaml

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    keys = {p.removeprefix("train.") for p in stage["params"] if isinstance(p, str) and p.startswith("train.")}
    assert keys == set(TrainParams.model_fields)
    assert "model" in stage["params"] and stage["cmd"] == "python -m pipelines.train"
    outs = {next(iter(o)) if isinstance(o, dict) else o: o for o in stage["outs"]}
    assert outs["checkpoints"]["checkpoints"]["persist"] is True
