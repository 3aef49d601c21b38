"""flows/repro.py: a flow run's log keeps the stage's lines and progress, and leaves out library bars and DVC's hints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import psutil
import pytest

from flows.repro import repro, shown

# what `dvc repro` printed in a flow run (a tiny pipeline, stdout a pipe), split at \r and \n as repro reads it
DROPPED = [
    "Training: |          | 0/? [00:00<?, ?it/s]",
    "train:  50%|█████     | 4/8 [00:00<00:00, 21.14it/s, loss=5.440, tok/s=8.29e+3, val_loss=5.270]",
    "Validation DataLoader 0:  50%|█████     | 1/2 [00:00<00:00, 173.04it/s]",
    "Generating test split: 4 examples [00:00, 674.68 examples/s]",
    "Downloading artifacts:  17%|█▋        | 1/6 [00:00<00:00, 18558.87it/s]",
    "Generating lock file 'dvc.lock'",
    "Updating lock file 'dvc.lock'",
    "To track the changes with git, run:",
    "git add reports/.gitignore artifacts/.gitignore data/.gitignore dvc.lock .dvc/.gitignore",
    "To enable auto staging, run:",
    "dvc config core.autostage true",
    "Use `dvc push` to send your updates to remote storage.",
    "Stage 'ingest' didn't change, skipping",  # upstream of the stage the task runs
    "",
]


KEPT = [
    "Running stage 'train':",
    "> python -m pipelines.train",
    "Stage 'clean' didn't change, skipping",
    "evaluate: held-out loss over 2030 test tokens (stride 32)",
    "train 40% (480 of 1,200 steps, 2m10s)",
    "register: quill-test v1 ['champion']: promoted (first model: no champion existed)",
]


@pytest.mark.parametrize("line", DROPPED + KEPT)
def test_the_log_keeps_the_story_and_drops_bars_and_dvc_hints(line):
    assert shown(line, "clean") == (line in KEPT)


STAGE = textwrap.dedent(
    """
    import sys, time
    for i in range(5):
        sys.stderr.write(f"\\rsetup: {i * 25}%|##  | {i}/4 [00:00<00:01, 9.1it/s]")  # a library's bar
        sys.stderr.flush()
    print()
    print("work 50% (5 of 10 steps, 6 s)", file=sys.stderr, flush=True)
    print("work 100% (10 of 10 steps, 12 s)", file=sys.stderr, flush=True)
    open("out.txt", "w").write("done")
    print("work: 10 steps done", flush=True)
    """
)


def dvc_project(root, stage: str) -> None:
    """A git repository with DVC and one stage, `work`, that runs `stage` (a Python script) and writes out.txt."""
    (root / "stage.py").write_text(stage)
    (root / "dvc.yaml").write_text(
        json.dumps(
            {"stages": {"work": {"cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "outs": ["out.txt"]}}}
        )
    )
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)


def test_repro_logs_the_stage_and_reports_its_progress_lines(tmp_path, monkeypatch):
    """A real `dvc repro` in a git repository: the stage's lines and progress arrive, DVC's hints do not."""
    dvc_project(tmp_path, STAGE)
    monkeypatch.chdir(tmp_path)
    logged, reported = [], []
    result = repro("work", logged.append, lambda what, percent: reported.append((what, percent)))
    assert result.ran and reported == [("work", 50.0), ("work", 100.0)]
    assert "work: 10 steps done" in logged and "Running stage 'work':" in logged
    assert not [line for line in logged if "git add" in line or "%|" in line or "lock file" in line], logged


SLOW_STAGE = textwrap.dedent(
    """
    import os, sys, time
    open("stage.pid", "w").write(str(os.getpid()))
    print("work 10% (1 of 10 steps, 1 s)", file=sys.stderr, flush=True)
    time.sleep(120)
    """
)


def test_a_failing_caller_stops_dvc_and_its_stage(tmp_path, monkeypatch):
    """The task's own code fails mid-stage (once, a Prefect artifact it could not create): the stage and DVC are
    stopped, so the task's retry finds no stage still running and holding DVC's locks."""
    dvc_project(tmp_path, SLOW_STAGE)
    monkeypatch.chdir(tmp_path)

    def failing(what: str, percent: float) -> None:
        raise ValueError("the caller's own error")

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="the caller's own error"):
        repro("work", lambda line: None, failing)
    stage = int((tmp_path / "stage.pid").read_text())
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left and not (psutil.pid_exists(stage) and psutil.Process(stage).status() != psutil.STATUS_ZOMBIE)
