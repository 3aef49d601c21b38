"""The README's commands work exactly as written, without an activated virtual environment (issue 10).

`.venv/bin/dvc repro` runs each stage's `python -m pipelines.<stage>` through the shell; with the venv not on
PATH that `python` was the system's ("No module named 'tqdm'"). `make setup` installs a .pth line that puts
.venv/bin first on PATH for every venv interpreter. Here: a tiny workspace (a git copy of the repo), its .venv
a link to ours, PATH without any venv, and the README's commands as a user types them. The workspace is a copy of the session's
finished one (tests/conftest.py): the Run button's first run built every stage of it through the same commands.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.paths import REPO, VENV_BIN

# end to end: the first test here may also wait for the session's services and the Run button's first run
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def bare_env(root: Path) -> dict[str, str]:
    """A user's shell: no venv anywhere on PATH (a system `python` may well be there), nothing activated."""
    venvs = {str(VENV_BIN), str(REPO / ".venv" / "bin"), str(root / ".venv" / "bin")}
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and p.rstrip("/") not in venvs)
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PREFECT_API_URL")
    }
    return {**env, "PATH": path, "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}


def sh(root: Path, command: str, timeout: float = 600) -> str:
    """Run one README line in `root` through the shell, as typed."""
    result = subprocess.run(
        command, shell=True, cwd=root, env=bare_env(root), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"`{command}` failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


@pytest.fixture
def workspace(finished_workspace) -> Path:
    """A copy of the session's finished tiny workspace with its .venv a link to ours, set up as the README says."""
    root = finished_workspace
    (root / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    # `make setup` as written, minus reinstalling the lock (-o: the stamp counts as up to date), which the
    # shared test venv must not do mid-suite
    sh(root, "make -o .venv/.installed setup")
    return root


def test_the_venv_interpreter_puts_its_bin_first_on_path(workspace):
    out = sh(workspace, ".venv/bin/python -c 'import os, shutil; print(shutil.which(\"python\"))'")
    assert Path(out.strip()).parent == workspace / ".venv" / "bin"


def test_the_readme_commands_work_without_an_activated_venv(workspace):
    """Each stage is `python -m pipelines.<stage>` run by DVC through the shell: an experiment with another model
    reruns train, evaluate and register, and the chat model's stages on the new base, that way (the finished run stopped nothing: no 'delete checkpoints/'),
    and the inspection commands read what they wrote."""
    # the Run button ran every stage, the fine-tuning ones included: DVC finds them all up to date
    assert "Data and pipelines are up to date" in sh(workspace, ".venv/bin/dvc repro")
    # a stage module by hand: the finished run re-exports without training
    assert '"resumed_from_step": 8' in sh(workspace, ".venv/bin/python -m pipelines.train")
    out = sh(workspace, ".venv/bin/dvc exp run -S model.n_embd=96")
    assert "No module named" not in out and "delete checkpoints" not in out
    for stage in ("train", "evaluate", "register", "finetune", "chat_eval", "chat_register"):  # on the new base
        assert f"Running stage '{stage}'" in out, stage
    metrics = json.loads((workspace / "metrics" / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 8
    assert json.loads((workspace / "artifacts" / "model" / "config.json").read_text())["hidden_size"] == 96
    assert "Data and pipelines are up to date" in sh(workspace, ".venv/bin/dvc repro")
    assert "train" in sh(workspace, ".venv/bin/python -m pipelines.summary")
    assert "metrics/train.json" in sh(workspace, ".venv/bin/dvc metrics show")
    assert "train" in sh(workspace, ".venv/bin/dvc dag")
    sh(workspace, ".venv/bin/dvc metrics diff")
