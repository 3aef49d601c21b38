"""A stage killed with SIGKILL leaves nothing that the next run keeps; atomic_dir publishes complete, synced,
normally readable outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.common import atomic
from pipelines.common.atomic import atomic_dir
from tests.helpers.corpus import write_corpus
from tests.helpers.paths import REPO, run_module

# Runs a stage in-process with one step replaced by SIGKILL, as an OOM killer or `kill -9` would end it.
KILLED_RUN = """
import os, signal, sys
import pipelines.{stage}.stage as stage
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
assert hasattr(stage, "{step}"), "no step {step} to kill the stage at"
stage.{step} = die
sys.exit(stage.main([]))
"""


def run_killed(stage: str, step: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLED_RUN.format(stage=stage, step=step)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_scratch_left_by_sigkill_is_removed_by_the_next_run(tmp_path: Path):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "params.yaml").write_text("data:\n  sources:\n    - {type: local, path: corpus}\n  min_chars: 50\n")
    data = tmp_path / "data"

    run_killed("ingest", "write_json", tmp_path)  # killed after copying, before the manifest
    left = hidden(data)
    assert any(n.startswith(".raw.") and n.endswith(".tmp") for n in left), left
    run_module("pipelines.ingest", tmp_path, check=True)
    assert hidden(data) == [] and (data / "raw" / "manifest.json").is_file()

    run_killed("clean", "_near_duplicates", tmp_path)  # killed with the shards and their rows written
    assert any(n.startswith(".clean-scratch-") for n in hidden(data)), hidden(data)
    run_module("pipelines.clean", tmp_path, check=True)
    assert hidden(data) == []


def test_scratch_of_a_live_process_is_left_alone(tmp_path: Path):
    live = tmp_path / f".clean-scratch-{os.getppid()}.abcdefgh"  # our parent is alive
    dead = tmp_path / ".clean-scratch-4999999.abcdefgh"  # above any pid_max: never alive
    other = tmp_path / ".clean-scratch-notes.txt"  # not a scratch name
    for path in (live, dead):
        path.mkdir()
    other.write_text("keep me")
    with atomic.scratch_dir(tmp_path, ".clean-scratch-") as scratch:
        assert scratch.name.startswith(f".clean-scratch-{os.getpid()}.")
        assert live.is_dir() and other.is_file() and not dead.exists()
    assert not scratch.exists()


def test_atomic_dir_output_has_normal_permissions_and_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (out / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    names = {Path(p).name for p in synced}
    assert {"weights.bin", "config.json", "sub", tmp.name, tmp_path.name} <= names


def test_a_crash_between_the_two_renames_keeps_the_previous_output(tmp_path: Path):
    out = tmp_path / "raw"
    old = tmp_path / ".raw.old"  # what a SIGKILL right after `os.replace(path, old)` leaves
    old.mkdir()
    (old / "manifest.json").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("the new run fails too")
    assert (out / "manifest.json").read_text() == "previous" and not old.exists()
