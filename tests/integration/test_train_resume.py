"""train: interrupted runs (SIGKILL at an arbitrary moment, SIGTERM) end with the same weights as an uninterrupted one.

Each run is `python -m pipelines.train` in its own folder, as DVC runs it, on the tiny model with
gradient accumulation (so a checkpoint must land on a step boundary to resume exactly).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pipelines.common.training.checkpoints import list_checkpoints
from tests.helpers.projects import TINY_TRAIN, build_shards
from tests.helpers.services import copy_store
from tests.helpers.training import (
    finish,
    kill,
    mlflow_runs,
    newest_step,
    one_value_per_step,
    run_dir,
    start,
    wait_for_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRAIN = {**TINY_TRAIN, "max_steps": 48, "grad_accum": 2, "batch_size": 8, "checkpoint_every": 8, "val_every": 16}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("resume-shards"))


def workdir(root: Path, shards: Path, store: Path) -> Path:
    """A run folder: the shards, a tiny params.yaml, a copy of the migrated MLflow store."""
    root.mkdir(parents=True)
    shutil.copytree(shards, root / "data")
    copy_store(store, root)
    params = {"data": {"sources": [{"type": "local", "path": "corpus"}]}, "model": {"preset": "tiny"}, "train": TRAIN}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def weights(cwd: Path) -> dict:
    return load_file(cwd / "artifacts" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, mlflow_template) -> dict:
    """Weights of an uninterrupted run."""
    cwd = workdir(tmp_path_factory.mktemp("ref") / "run", shards, mlflow_template)
    metrics = finish("train", cwd)
    assert metrics["steps"] == 48 and metrics["resumed_from_step"] == 0
    return weights(cwd)


def test_sigkill_then_rerun_gives_the_uninterrupted_weights_in_the_same_mlflow_run(
    tmp_path, shards, reference, mlflow_template
):
    cwd = workdir(tmp_path / "run", shards, mlflow_template)
    proc = start("train", cwd)
    wait_for_checkpoint(cwd / "checkpoints", proc, 8)
    kill(proc)
    killed_at = newest_step(cwd / "checkpoints")
    assert killed_at < 48 and not (cwd / "artifacts" / "model").exists()

    metrics = finish("train", cwd)
    assert metrics["steps"] == 48 and metrics["resumed_from_step"] >= 8
    assert metrics["tokens_seen"] == 48 * 2 * 8 * 64
    resumed = weights(cwd)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] - reference[name]).abs().max().item() <= 1e-6, name

    client, found = mlflow_runs(cwd)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    run_id = found[0].info.run_id
    assert json.loads((cwd / "artifacts" / "model" / "quill_run.json").read_text())["mlflow_run_id"] == run_id
    history = client.get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(range(2, 49, 2)) and one_value_per_step(history)  # the curve continues
    assert [int(line.split(",")[0]) for line in (cwd / "plots" / "train" / "val.csv").read_text().split()[1:]] == [
        16,
        32,
        48,
    ]


def test_sigterm_saves_at_the_next_step_boundary_and_exits_143(tmp_path, shards, reference, mlflow_template):
    cwd = workdir(tmp_path / "run", shards, mlflow_template)
    proc = start("train", cwd)
    wait_for_checkpoint(cwd / "checkpoints", proc, 8)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: saved" in err and "Traceback" not in err
    stopped_at = newest_step(cwd / "checkpoints")
    assert 8 <= stopped_at < 48
    client, found = mlflow_runs(cwd)
    assert found[0].info.status == "KILLED"

    metrics = finish("train", cwd)
    assert metrics["resumed_from_step"] == stopped_at and metrics["steps"] == 48
    resumed = weights(cwd)
    for name in reference:
        assert (resumed[name] - reference[name]).abs().max().item() <= 1e-6, name
    client, found = mlflow_runs(cwd)
    assert len(found) == 1 and found[0].info.status == "FINISHED"


def test_ddp_on_two_cpu_processes_with_bf16_trains_and_refuses_a_world_size_change(tmp_path, shards, mlflow_template):
    """The multi-device paths CI has no GPU for: DDP (gloo, 2 CPU processes) and bf16-mixed autocast."""
    cwd = workdir(tmp_path / "ddp", shards, mlflow_template)
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["train"].update(
        max_steps=8,
        checkpoint_every=4,
        val_every=4,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="bf16-mixed",
    )
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = finish("train", cwd)
    assert metrics["steps"] == 8 and metrics["tokens_seen"] == 8 * 2 * TRAIN["grad_accum"] * TRAIN["batch_size"] * 64
    assert (cwd / "artifacts" / "model" / "model.safetensors").is_file()
    (cwd / "artifacts").rename(cwd / "artifacts-ddp")
    list_checkpoints(run_dir(cwd / "checkpoints"))[0][1].unlink()  # as if killed after step 4
    params["train"].update(devices=1, strategy="auto")  # resuming on one device changes the data order
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    proc = start("train", cwd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "world size" in err, err[-2000:]
