"""`make run`, `make stop`, `make status`'s bookkeeping (flows/stack.py): a recorded process is the same process only
if it started when the recorded one did, stop puts back a params.yaml that a killed flow run left its overrides in,
and the MLflow UI is `mlflow server` on the stages' own store (started, found again, listed and stopped) or the
tracking server itself."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from flows import stack
from flows.lock import workspace_lock
from flows.overrides import ORIGINAL
from pipelines.common.tracking import get_or_create_experiment, mlflow_client
from tests.helpers.paths import free_port
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


# --- the MLflow UI ------------------------------------------------------------------------------------------------


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def tracking_server():
    """The URL of something answering /health as an MLflow tracking server does."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_tracking_server_is_its_own_ui_and_nothing_starts(tmp_path, monkeypatch, tracking_server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server + "/")
    assert stack.ensure_mlflow_ui() == tracking_server
    assert stack.recorded() == {}


def test_an_unreachable_tracking_server_is_named_with_its_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(stack.StackError, match="is unreachable .* unset MLFLOW_TRACKING_URI to use the local store"):
        stack.ensure_mlflow_ui()
    assert stack.recorded() == {}


def test_the_ui_port_is_5000_or_the_next_free_one():
    assert stack.MLFLOW_UI_PORT == 5000  # MLflow's own default
    with socket.socket() as taken:
        taken.bind((stack.LOOPBACK, free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        chosen = stack.first_free_port(stack.LOOPBACK, port)
        assert port < chosen < port + 100 and not stack.port_taken(stack.LOOPBACK, chosen)
        with pytest.raises(stack.StackError, match=f"ports {port} to {port} on 127.0.0.1 are all taken"):
            stack.first_free_port(stack.LOOPBACK, port, count=1)


def test_a_ui_that_does_not_start_is_named_with_its_log_and_not_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(stack, "MLFLOW_UI_PORT", free_port())
    fake = tmp_path / "bin" / "mlflow"  # what `mlflow server` would be, beside this "interpreter"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'mlflow: no such store' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    url = f"http://127.0.0.1:{stack.MLFLOW_UI_PORT}"
    with pytest.raises(stack.StackError) as failed:
        stack.ensure_mlflow_ui()
    assert (
        str(failed.value)
        == f"the MLflow UI did not start at {url}/health (exited with 3); see .quill/logs/mlflow-ui.log"
    )
    assert "mlflow: no such store" in (tmp_path / ".quill" / "logs" / "mlflow-ui.log").read_text()
    assert stack.recorded() == {}


def test_local_store_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stack.local_store("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert stack.local_store(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path.resolve()}/x.db"
    assert stack.local_store("postgresql://db/mlflow") == "postgresql://db/mlflow"


@pytest.mark.integration
def test_the_mlflow_ui_shows_the_project_store_is_found_again_listed_and_stopped(
    tmp_path, monkeypatch, mlflow_uri, capsys
):
    monkeypatch.chdir(tmp_path)  # tmp_path/mlflow.db, the default store: MLFLOW_TRACKING_URI unset
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(stack, "MLFLOW_UI_PORT", free_port())
    client = mlflow_client()  # what a stage logs to
    run = client.create_run(get_or_create_experiment(client))
    client.log_text(run.info.run_id, "ROMEO:", "sample.txt")  # into mlartifacts/, beside mlflow.db

    url = stack.ensure_mlflow_ui()
    try:
        assert url == f"http://127.0.0.1:{stack.MLFLOW_UI_PORT}"
        assert "started the MLflow UI (pid " in capsys.readouterr().out
        # the UI shows the stages' runs and their artifacts
        found = httpx.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run.info.run_id}, timeout=30)
        assert found.status_code == 200 and found.json()["run"]["info"]["experiment_id"] == run.info.experiment_id
        artifact = httpx.get(f"{url}/get-artifact", params={"path": "sample.txt", "run_uuid": run.info.run_id})
        assert artifact.text == "ROMEO:"
        entry = json.loads((tmp_path / ".quill" / "pids" / "mlflow-ui.json").read_text())
        assert entry["url"] == url and stack.alive(entry)

        assert stack.ensure_mlflow_ui() == url  # found again: the same process, nothing started
        assert "started" not in capsys.readouterr().out and stack.recorded()["mlflow-ui"]["pid"] == entry["pid"]

        assert stack.status(None) == 0
        listed = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert ["mlflow-ui", "running,", "pid", str(entry["pid"]), url] in listed
    finally:
        assert stack.stop(None) == 0
    assert f"stopped mlflow-ui (pid {entry['pid']})" in capsys.readouterr().out
    assert not stack.alive(entry) and stack.recorded() == {}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
