"""The training stages (train, finetune) run as DVC runs them, for the resume tests: `python -m pipelines.<stage>` in
a folder of its own with its own MLflow store (folder/mlflow.db), waited for, killed at a checkpoint, run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from pipelines.common.layout import Layout
from pipelines.common.tracking import EXPERIMENT
from pipelines.common.training.checkpoints import list_checkpoints
from tests.helpers.paths import REPO, VENV_BIN


def start(stage: str, cwd: Path) -> subprocess.Popen:
    """`python -m pipelines.<stage>` started in `cwd` (stdout and stderr piped), on one CPU thread."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        # one thread: on tiny models a second one mostly waits for a core that another run or test worker holds
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", f"pipelines.{stage}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(stage: str, cwd: Path, proc: subprocess.Popen | None = None) -> dict:
    """Run the stage in `cwd` to the end (or wait for `proc`, started there already); its metrics/<stage>.json."""
    proc = proc or start(stage, cwd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(getattr(Layout().under(cwd), f"{stage}_metrics").read_text())


def wait_for_checkpoint(checkpoints: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """Until the run `proc` has written step `step`'s checkpoint in a configuration folder of `checkpoints`."""
    deadline = time.monotonic() + timeout
    while not list(checkpoints.glob(f"*/step-{step:08d}.ckpt")):
        assert proc.poll() is None, f"the run ended before its step-{step} checkpoint: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no step-{step} checkpoint in {checkpoints}/ after {timeout:.0f} s"
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: the run gets no chance to save or clean up."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def run_dir(checkpoints: Path) -> Path:
    """The one configuration's folder, checkpoints/<fingerprint>/ (pipelines/common/training/resume.py)."""
    [folder] = [p for p in checkpoints.iterdir() if p.is_dir()]
    return folder


def newest_step(checkpoints: Path) -> int:
    """The step of the newest checkpoint in the one configuration's folder."""
    return list_checkpoints(run_dir(checkpoints))[0][0]


def mlflow_runs(cwd: Path) -> tuple[MlflowClient, list]:
    """A client of the folder's MLflow store and the runs of quill's experiment in it."""
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])


def one_value_per_step(history: list) -> bool:
    """Whether a metric's history holds one value per step (a resumed run logs the steps it redoes again: equal
    values, if it redoes them exactly)."""
    by_step: dict[int, set] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(round(m.value, 6))
    return all(len(values) == 1 for values in by_step.values())
