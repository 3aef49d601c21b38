"""`make stop`'s bookkeeping (flows/stack.py): a recorded process is the same process only if it started when the
recorded one did, and stop puts back a params.yaml that a killed flow run left its overrides in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows import stack
from flows.lock import workspace_lock
from flows.overrides import ORIGINAL
from tests.helpers.services import wait_for


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # Popen may return before the child has exec'd, when /proc still shows no command line
    wait_for(lambda: stack.cmdline(proc.pid), 30, "the child's command line", every=0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_a_recorded_process_is_alive_only_with_its_own_start_time(sleeper):
    entry = {"pid": sleeper.pid, "started": stack.started_at(sleeper.pid), "cmd": ["x"]}
    assert stack.alive(entry)
    # the same pid with another start time: the kernel gave the pid to another process (a word of the command
    # line matching, which is all `stop` once asked, no longer makes it ours)
    assert not stack.alive({**entry, "started": entry["started"] - 5, "cmd": [sys.executable, "-c"]})
    sleeper.kill()
    sleeper.wait()
    assert not stack.alive(entry)


def test_a_record_without_a_start_time_needs_the_whole_command_line(sleeper):
    assert stack.alive({"pid": sleeper.pid, "cmd": [sys.executable, "-c"]})
    assert not stack.alive({"pid": sleeper.pid, "cmd": ["prefect", "-c"]})  # only its last word matches


def test_stop_puts_back_params_a_killed_run_left_overridden(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ORIGINAL.parent.mkdir(parents=True)
    ORIGINAL.write_text("train:\n  max_steps: 100\n")
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 99\n")  # what the killed run left
    assert stack.stop(None) == 0
    assert (tmp_path / "params.yaml").read_text() == "train:\n  max_steps: 100\n" and not ORIGINAL.exists()
    assert "the original is back" in capsys.readouterr().out


def test_stop_leaves_params_to_a_run_that_holds_the_workspace(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ORIGINAL.parent.mkdir(parents=True)
    ORIGINAL.write_text("train:\n  max_steps: 100\n")
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 99\n")
    with workspace_lock("a flow run started from the command line"):
        assert stack.stop(None) == 0
    assert (tmp_path / "params.yaml").read_text() == "train:\n  max_steps: 99\n" and ORIGINAL.exists()
    assert "params.yaml left as it is: another pipeline run holds this workspace" in capsys.readouterr().out
