"""`make run`, `make status`, `make stop` in a copy of the session's finished tiny workspace (the repository's venv
linked in), and `python -m pipelines.serve` against the local Ray that `make run` started: a taken port is named
with its setting; the first run starts the Prefect server, runs the flow against it (every stage up to date
through DVC) and deploys the champion on a local Ray it starts; the
second run redoes nothing; the serve CLI rolls the endpoint over to another model folder and reports on it; and
`make stop` leaves no process behind.

This is the one place outside the session's shared services where quill starts its own Prefect server and Ray:
that is what it tests. Every process of that Ray inherits a private TMPDIR, which is how any leftover is found."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.paths import REPO, VENV_BIN, free_port, run_module
from tests.helpers.services import ray_processes, wait_for
from tests.helpers.serving import listener, ray_tmpdir, tiny_model_folder
from tests.helpers.workspace import quill_env, tiny_workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def make(root: Path, env: dict, *targets: str, timeout: float = 240) -> subprocess.CompletedProcess:
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


def set_params(root: Path, **sections: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def workspace(finished_workspace):
    """(root, env, tmp): the copy with its own serve port, the environment of a user there (their own Prefect URL, a
    private TMPDIR, no Ray to join)."""
    root = finished_workspace
    set_params(root, serve={"port": free_port()})
    (root / ".venv").symlink_to(REPO / ".venv")
    with ray_tmpdir() as tmp:
        env = quill_env(
            root,
            PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
            PREFECT_HOME=str(root.parent / "client"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            TMPDIR=str(tmp),
            # as on the session's cluster (tests/helpers/services.py): replicas leaving HAProxy drain for 10 s
            RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="10",
        )
        env.pop("RAY_ADDRESS", None)
        try:
            yield root, env, tmp
        finally:
            if (root / ".quill" / "pids").is_dir() and any((root / ".quill" / "pids").iterdir()):
                make(root, env, "stop", timeout=120)


def test_a_taken_port_is_named_with_its_setting(tmp_path, mlflow_template):
    root = tiny_workspace(tmp_path / "ws", mlflow_template)
    (root / ".venv").symlink_to(REPO / ".venv")
    env = quill_env(root, PREFECT_HOME=str(tmp_path / "client"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = make(root, {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "run", timeout=120)
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is taken" in result.stderr and "PREFECT_API_URL" in result.stderr
    assert not list((root / ".quill" / "pids").glob("*.json"))


def cli(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_module("pipelines.serve", root, *args, env={**env, "PYTHONPATH": str(root)}, timeout=300)


@pytest.mark.timeout(600)
def test_make_run_twice_then_the_serve_cli_then_stop(workspace, tmp_path):
    root, env, tmp = workspace
    first = make(root, env, "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "Prefect UI" in out and "MLflow UI" in out and "started the Prefect server" in out
    # the MLflow UI is up on the workspace's own store: it shows the registered champion
    mlflow_ui = re.search(r"MLflow UI +(http://127\.0\.0\.1:\d+) ", out)
    assert mlflow_ui and "started the MLflow UI" in out, out
    assert httpx.get(f"{mlflow_ui[1]}/health", timeout=10).text == "OK"
    model = httpx.get(f"{mlflow_ui[1]}/api/2.0/mlflow/registered-models/get", params={"name": "quill-test"}, timeout=30)
    assert model.status_code == 200 and "champion" in model.text, model.text
    assert "Stage 'register' didn't change, skipping" in out and "Running stage" not in out
    port = yaml.safe_load((root / "params.yaml").read_text())["serve"]["port"]
    url = f"http://127.0.0.1:{port}"
    assert f"curl {url}/v1/completions" in out and "openai.OpenAI" in out
    assert "high-throughput mode (HAProxy ingress)" in out and listener(port) == "haproxy"
    metrics = re.search(r"Prometheus metrics (http://\S+/metrics)", out)
    stats = re.search(r"HAProxy stats (http://\S+/stats)", out)
    assert metrics and stats, out
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "The", "max_tokens": 4}, timeout=60)
    assert answer.status_code == 200, answer.text
    pids = {p.stem: json.loads(p.read_text()) for p in (root / ".quill" / "pids").glob("*.json")}
    assert {"prefect-server", "flows-deploy", "mlflow-ui", "serving"} <= set(pids)
    # the local Ray takes only clients with its token, which only this user can read
    token = root / ".quill" / "ray-auth-token"
    assert token.stat().st_mode & 0o777 == 0o600
    address = json.loads((root / ".quill" / "serve-ray.json").read_text())["address"]
    stranger = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    refused = subprocess.run(
        [str(VENV_BIN / "ray"), "status", f"--address={address}"],
        env=stranger,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert refused.returncode != 0 and "Authentication token" in refused.stdout + refused.stderr, refused
    api = env["PREFECT_API_URL"]
    runs = httpx.post(f"{api}/flow_runs/filter", json={}).json()
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]  # the run is in the server's UI

    second = make(root, env, "run")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "Stage 'train' didn't change, skipping" in out and "Running stage" not in out
    assert "already serves quill-test v1" in out  # no redeploy
    assert "started the Prefect server" not in out and "started the MLflow UI" not in out  # reused
    assert f"MLflow UI   {mlflow_ui[1]} " in out

    status = make(root, env, "status", timeout=120)
    assert "prefect-server" in status.stdout and "running, pid" in status.stdout
    assert re.search(rf"mlflow-ui +running, pid \d+ +{mlflow_ui[1]}", status.stdout), status.stdout

    # the serve CLI joins the local Ray that `make run` started (its record is in the workspace's .quill/): a rolling
    # update to another model folder; a mode the running Ray was not started with is named, not applied
    alpha = tiny_model_folder(tmp_path / "a", seed=0, name="alpha")
    set_params(root, serve={"high_throughput": False})
    r = cli(root, env, "--model", str(alpha))
    assert r.returncode == 0 and "rolling update" in r.stdout, r.stdout + r.stderr
    assert "the local Ray was started with serve.high_throughput: True" in r.stdout
    assert f"serve: alpha (version local, {alpha}) at {url}/v1" in r.stdout
    assert "python -m pipelines.serve shutdown" in r.stdout
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok", "model": "alpha", "version": "local"}
        assert http.get("/v1/models").json()["data"][0]["id"] == "alpha"
        done = http.post("/v1/completions", json={"prompt": "To be", "max_tokens": 4, "ignore_eos": True}).json()
        assert done["model"] == "alpha" and done["usage"]["completion_tokens"] == 4
        assert "quill" in http.get(stats[1]).text  # HAProxy's stats page names the app's backend
    r = cli(root, env, "status")
    assert r.returncode == 0 and "RUNNING" in r.stdout and "alpha" in r.stdout, r.stdout + r.stderr
    # the metrics URL printed is Ray's Prometheus export of this node
    wait_for(lambda: "ray_quill_requests_total" in httpx.get(metrics[1], timeout=10).text, 60, "quill metrics")
    assert ray_processes(tmp)  # what stop must end: GCS, raylet, dashboard, Serve's controller, HAProxy, replica

    stop = make(root, env, "stop", timeout=180)
    assert stop.returncode == 0 and "stopped prefect-server" in stop.stdout, stop.stdout + stop.stderr
    assert "serving: shut down" in stop.stdout and "stopped mlflow-ui" in stop.stdout, stop.stdout
    for entry in (e for e in pids.values() if "pid" in e):
        assert (
            not Path(f"/proc/{entry['pid']}").exists() or "zombie" in Path(f"/proc/{entry['pid']}/status").read_text()
        )

    def gone():
        left = processes_in(str(root), str(tmp))
        assert not left, left
        return True

    wait_for(gone, 15, "every process of the workspace and its Ray stopped")
    r = cli(root, env, "status")
    assert r.returncode == 1 and "not running" in r.stdout, r.stdout + r.stderr
    assert "nothing" in make(root, env, "status", timeout=60).stdout
    for stopped in (url, mlflow_ui[1]):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{stopped}/health", timeout=5)
