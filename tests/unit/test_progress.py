"""Progress and the story a run tells: a bar on a terminal, a line per 10 % anywhere else (pipelines/common/progress.py,
the train stage's step_progress); flows/repro.py keeps the stage's lines and progress and leaves out library bars and
DVC's hints; each stage task ends with one line saying what the stage did."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from tqdm import tqdm

from flows.repro import Repro, repro, shown
from flows.train_and_deploy import what_it_did
from pipelines.common import progress as progress_module
from pipelines.common.progress import LINE, ProgressLines, progress_bar, reporter, track


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_line_per_ten_percent_not_per_step(capsys):
    lines = ProgressLines(1000, "train", "step", quiet_s=0)
    for _ in range(1000):
        lines.update(1)
    out = lines_of(capsys)
    assert [int(LINE.match(line)["percent"]) for line in out] == list(range(10, 101, 10))
    assert out[3].startswith("train 40% (400 of 1,000 steps, ")


def test_nothing_before_the_quiet_time_then_where_it_is(capsys):
    clock = Clock()
    lines = ProgressLines(100, "clean: read", "file", quiet_s=5, clock=clock)
    for _ in range(35):  # 35 % in 3.5 s: a loop this quick prints nothing
        clock.now += 0.1
        lines.update(1)
    assert lines_of(capsys) == []
    clock.now = 6.0
    lines.update(5)  # 40 %: the first line says how far it is, the next ones come per 10 %
    for _ in range(60):
        lines.update(1)
    out = lines_of(capsys)
    assert [LINE.match(line)["percent"] for line in out] == ["40", "50", "60", "70", "80", "90", "100"]
    assert out[0] == "clean: read 40% (40 of 100 files, 6 s)"


def test_a_resumed_loop_counts_from_where_it_was(capsys):
    lines = ProgressLines(1200, "train", "step", initial=600, quiet_s=0)
    lines.update(60)  # 55 %
    lines.update(60)  # 60 %
    assert [LINE.match(line)["percent"] for line in lines_of(capsys)] == ["60"]


def test_bytes_are_shown_scaled(capsys):
    lines = ProgressLines(12_400_000, "tokenize", "B", unit_scale=True, quiet_s=0)
    lines.update(4_960_000)
    (line,) = lines_of(capsys)
    assert line.startswith("tokenize 40% (4.96M of 12.4M B, ") and LINE.match(line)


def test_a_terminal_gets_a_bar_anything_else_lines(monkeypatch):
    assert isinstance(reporter(10, "x"), ProgressLines)  # pytest's captured stderr is no terminal
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    bar = reporter(10, "x")
    assert isinstance(bar, tqdm)
    bar.close()


def test_track_and_the_model_callback_report_through_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "QUIET_S", 0.0)
    assert list(track(range(20), "clean: write", "doc")) == list(range(20))
    report = progress_bar("held-out")
    for done in range(1, 41):
        report(done, 40)
    out = lines_of(capsys)
    assert out[0] == "clean: write 10% (2 of 20 docs, 0 s)" and out[10] == "held-out 10% (4 of 40 batches, 0 s)"
    assert len(out) == 20
    assert progress_bar(None) is None


def test_the_train_stage_draws_a_bar_only_on_a_terminal(monkeypatch):
    from pipelines.train import log

    assert isinstance(log.step_progress(), log.StepLines)
    monkeypatch.setattr(log, "on_terminal", lambda: True)
    assert isinstance(log.step_progress(), log.StepProgressBar)


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


def test_repro_logs_the_stage_and_reports_its_progress_lines(tmp_path, monkeypatch):
    """A real `dvc repro` in a git repository: the stage's lines and progress arrive, DVC's hints do not."""
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(
        json.dumps(
            {"stages": {"work": {"cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "outs": ["out.txt"]}}}
        )
    )
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    logged, reported = [], []
    result = repro("work", logged.append, lambda what, percent: reported.append((what, percent)))
    assert result.ran and reported == [("work", 50.0), ("work", 100.0)]
    assert "work: 10 steps done" in logged and "Running stage 'work':" in logged
    assert not [line for line in logged if "git add" in line or "%|" in line or "lock file" in line], logged


def test_each_stage_task_ends_with_what_the_stage_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    clean = {"docs_in": 93, "docs_out": 51, "exact_duplicates": 7, "near_duplicates": 35, "dropped": {"x": 0}}
    (tmp_path / "metrics" / "clean.json").write_text(json.dumps({**clean, "quarantined": 0}))
    assert what_it_did(Repro("clean", True, 3.4)) == (
        "clean: ran in 3 s; 51 of 93 documents kept (7 exact and 35 near duplicates, 0 dropped or quarantined)"
    )
    assert what_it_did(Repro("tokenize", False, 1.0)) == "tokenize: up to date (DVC skipped it)"
    assert what_it_did(Repro("ingest", True, 2.0)) == "ingest: ran in 2 s"
