"""`make run`, `make status`, `make stop` in a tiny workspace (the repository's venv linked in): a taken port is
named with its setting, the first run starts the services and runs the flow against the Prefect server, the
second retrains nothing, and `make stop` leaves no process behind. About three minutes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.paths import REPO, free_port
from tests.helpers.workspace import quill_env, tiny_workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def make(root: Path, env: dict, *targets: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # -o: the linked venv counts as set up (never reinstalled from here)
    return subprocess.run(
        ["make", "-o", ".venv/.installed", *targets], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def processes_in(*places: str) -> list[str]:
    """Command lines of the processes working in, or naming, one of `places` (the workspace, the temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = os.readlink(proc / "cwd")
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(cwd.startswith(p) or p in cmd for p in places):
                found.append(cmd)
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("make-run") / "ws")
    (root / ".venv").symlink_to(REPO / ".venv")
    port = free_port()
    # a private temp dir: the serve CLI's record of the local Ray it starts (and Ray's own files) live there, apart
    # from any other Ray on the machine; short, for Ray's socket paths
    tmp = tempfile.mkdtemp(prefix="rq", dir="/tmp")
    env = quill_env(
        root,
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_HOME=str(root.parent / "client"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TMPDIR=tmp,
    )
    env.pop("RAY_ADDRESS", None)
    yield root, env
    if (root / ".quill" / "pids").is_dir() and any((root / ".quill" / "pids").iterdir()):
        make(root, env, "stop", timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_taken_port_is_named_with_its_setting(workspace):
    root, env = workspace
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = make(root, {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "run", timeout=120)
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is taken" in result.stderr and "PREFECT_API_URL" in result.stderr
    assert not list((root / ".quill" / "pids").glob("*.json")) if (root / ".quill" / "pids").exists() else True


def test_make_run_twice_then_stop(workspace):
    root, env = workspace
    started = time.monotonic()
    first = make(root, env, "run")
    first_s = time.monotonic() - started
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "Prefect UI" in out and "MLflow UI" in out and "Running stage 'train'" in out
    port = yaml.safe_load((root / "params.yaml").read_text())["serve"]["port"]
    assert f"curl http://127.0.0.1:{port}/v1/completions" in out and "openai.OpenAI" in out
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "The", "max_tokens": 4}, timeout=60)
    assert answer.status_code == 200, answer.text
    pids = {p.stem: json.loads(p.read_text()) for p in (root / ".quill" / "pids").glob("*.json")}
    assert {"prefect-server", "flows-deploy", "serving"} <= set(pids)
    api = env["PREFECT_API_URL"]
    runs = httpx.post(f"{api}/flow_runs/filter", json={}).json()
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]  # the run is in the server's UI

    started = time.monotonic()
    second = make(root, env, "run")
    second_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "Stage 'train' didn't change, skipping" in out and "Running stage" not in out
    assert "started the Prefect server" not in out  # reused
    assert second_s < 120, f"second make run took {second_s:.0f} s"
    print(f"make run: first {first_s:.0f} s, second {second_s:.0f} s")

    status = make(root, env, "status", timeout=120)
    assert "prefect-server" in status.stdout and "running, pid" in status.stdout

    stop = make(root, env, "stop", timeout=180)
    assert stop.returncode == 0 and "stopped prefect-server" in stop.stdout, stop.stdout + stop.stderr
    for entry in (e for e in pids.values() if "pid" in e):
        assert (
            not Path(f"/proc/{entry['pid']}").exists() or "zombie" in Path(f"/proc/{entry['pid']}/status").read_text()
        )
    time.sleep(1)
    assert processes_in(str(root), env["TMPDIR"]) == [], processes_in(str(root), env["TMPDIR"])
    assert "nothing" in make(root, env, "status", timeout=60).stdout
