"""train: interrupted runs (SIGKILL at an arbitrary moment, SIGTERM) end with the same weights as an uninterrupted one.

Each run is `python -m pipelines.train` in its own folder, as DVC runs it, on the tiny model with
gradient accumulation (so a checkpoint must land on a step boundary to resume exactly).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pipelines.common.training.checkpoints import list_checkpoints
from tests.helpers.paths import REPO, VENV_BIN
from tests.helpers.projects import TINY_TRAIN, build_shards
from tests.helpers.services import copy_store

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


def start(cwd: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.train"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(cwd: Path) -> dict:
    proc = start(cwd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((cwd / "metrics" / "train.json").read_text())


def run_dir(cwd: Path) -> Path:
    """The configuration's folder, checkpoints/<fingerprint>/ (pipelines/train/resume.py)."""
    [folder] = [p for p in (cwd / "checkpoints").iterdir() if p.is_dir()]
    return folder


def wait_for_checkpoint(cwd: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 240
    while not list((cwd / "checkpoints").glob(f"*/step-{step:08d}.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def weights(cwd: Path) -> dict:
    return load_file(cwd / "artifacts" / "model" / "model.safetensors")


def runs(cwd: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("quill").experiment_id])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, mlflow_template) -> dict:
    """Weights of an uninterrupted run."""
    cwd = workdir(tmp_path_factory.mktemp("ref") / "run", shards, mlflow_template)
    metrics = finish(cwd)
    assert metrics["steps"] == 48 and metrics["resumed_from_step"] == 0
    return weights(cwd)


def test_sigkill_then_rerun_gives_the_uninterrupted_weights_in_the_same_mlflow_run(
    tmp_path, shards, reference, mlflow_template
):
    cwd = workdir(tmp_path / "run", shards, mlflow_template)
    proc = start(cwd)
    wait_for_checkpoint(cwd, proc, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(run_dir(cwd))[0][0]
    assert killed_at < 48 and not (cwd / "artifacts" / "model").exists()

    metrics = finish(cwd)
    assert metrics["steps"] == 48 and metrics["resumed_from_step"] >= 8
    assert metrics["tokens_seen"] == 48 * 2 * 8 * 64
    resumed = weights(cwd)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] - reference[name]).abs().max().item() <= 1e-6, name

    client, found = runs(cwd)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    run_id = found[0].info.run_id
    assert json.loads((cwd / "artifacts" / "model" / "quill_run.json").read_text())["mlflow_run_id"] == run_id
    history = client.get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(range(2, 49, 2))  # the curve continues (steps redone log equal values)
    by_step: dict[int, set] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(round(m.value, 6))
    assert all(len(values) == 1 for values in by_step.values())
    assert [int(line.split(",")[0]) for line in (cwd / "plots" / "train" / "val.csv").read_text().split()[1:]] == [
        16,
        32,
        48,
    ]


def test_sigterm_saves_at_the_next_step_boundary_and_exits_143(tmp_path, shards, reference, mlflow_template):
    cwd = workdir(tmp_path / "run", shards, mlflow_template)
    proc = start(cwd)
    wait_for_checkpoint(cwd, proc, 8)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: saved" in err and "Traceback" not in err
    stopped_at = list_checkpoints(run_dir(cwd))[0][0]
    assert 8 <= stopped_at < 48
    client, found = runs(cwd)
    assert found[0].info.status == "KILLED"

    metrics = finish(cwd)
    assert metrics["resumed_from_step"] == stopped_at and metrics["steps"] == 48
    resumed = weights(cwd)
    for name in reference:
        assert (resumed[name] - reference[name]).abs().max().item() <= 1e-6, name
    client, found = runs(cwd)
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
    metrics = finish(cwd)
    assert metrics["steps"] == 8 and metrics["tokens_seen"] == 8 * 2 * TRAIN["grad_accum"] * TRAIN["batch_size"] * 64
    assert (cwd / "artifacts" / "model" / "model.safetensors").is_file()
    (cwd / "artifacts").rename(cwd / "artifacts-ddp")
    list_checkpoints(run_dir(cwd))[0][1].unlink()  # as if killed after step 4
    params["train"].update(devices=1, strategy="auto")  # resuming on one device changes the data order
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    proc = start(cwd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "world size" in err, err[-2000:]
