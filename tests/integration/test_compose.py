"""docker-compose.yml without a Docker engine: validated against the Compose specification's schema, checked for
what the team stack promises (pinned images, health checks, healthy dependencies, no default secrets), and the
commands of its mlflow, prefect and ray-head services started for real on loopback ports."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.serve import HIGH_THROUGHPUT_ENV
from tests.helpers.paths import REPO, VENV_BIN, free_port
from tests.helpers.workspace import stop, wait_http

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_file_matches_the_compose_specification():
    result = subprocess.run(
        [
            str(VENV_BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(REPO / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_are_pinned_and_services_are_healthy_before_their_dependants_start():
    for name, service in SERVICES.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        if "build" in service:
            assert service["build"]["context"] == "." and (REPO / "Dockerfile").is_file()
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no health check"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES
            expected = (
                "service_completed_successfully" if SERVICES[dependency].get("restart") == "no" else "service_healthy"
            )
            assert condition == {"condition": expected}, f"{name} -> {dependency}: {condition}"
    assert {"postgres-data", "minio-data", "quill-workspace"} <= set(COMPOSE["volumes"])
    assert {"postgres", "minio", "mlflow", "prefect", "prefect-worker", "ray-head"} <= set(SERVICES)


def test_secrets_come_from_the_env_file_and_have_no_defaults():
    text = (REPO / "docker-compose.yml").read_text()
    secret = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN")
    for match in re.finditer(r"\$\{([A-Z_]+)(:?[-?][^}]*)?\}", text):
        name, rest = match.group(1), match.group(2) or ""
        if secret.search(name):
            assert not rest.startswith((":-", "-")), f"{name} has a default in docker-compose.yml"
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), f".env.example lacks {required - set(example)}"
    assert all(value == "" for key, value in example.items() if secret.search(key)), "a secret has a value"
    worker = SERVICES["prefect-worker"]["environment"]
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "QUILL_API_KEY"} <= set(worker)


def test_the_ray_head_starts_ray_serve_in_the_high_throughput_mode_quill_uses():
    env = SERVICES["ray-head"]["environment"]
    assert {k: env.get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV  # as serve.high_throughput starts Ray


def command(service: str, **replace: str) -> list[str]:
    """The service's command from docker-compose.yml with `--flag=value` (or `--flag value`) values replaced."""
    args = list(SERVICES[service]["command"])
    for flag, value in replace.items():
        flag = "--" + flag.replace("_", "-")
        for i, arg in enumerate(args):
            if arg.startswith(flag + "="):
                args[i] = f"{flag}={value}"
            elif arg == flag:
                args[i + 1] = value
    return [str(VENV_BIN / args[0]), *args[1:]]


@pytest.mark.integration
def test_the_mlflow_service_command_serves_artifacts_behind_basic_auth(tmp_path: Path):
    port = free_port()
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path}/auth.db\nadmin_username = admin\nadmin_password = s3cret-for-test\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    cmd = command(
        "mlflow",
        host="127.0.0.1",
        port=str(port),
        backend_store_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifacts_destination=str(tmp_path / "artifacts"),
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=120)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
        assert httpx.post(url, json={"max_results": 1}, timeout=60).status_code == 401
        ok = httpx.post(url, json={"max_results": 1}, auth=("admin", "s3cret-for-test"), timeout=60)
        assert ok.status_code == 200, ok.text
    finally:
        stop(proc)
        log.close()


@pytest.mark.integration
def test_the_prefect_service_command_answers(tmp_path: Path):
    port = free_port()
    cmd = command("prefect", host="127.0.0.1", port=str(port))
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
    }
    log = open(tmp_path / "prefect.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, timeout=120)
    finally:
        stop(proc)
        log.close()


@pytest.mark.integration
def test_the_ray_head_command_starts_a_cluster_and_stops_cleanly():
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cmd = [
        *command("ray-head", port=str(port), dashboard_host="127.0.0.1"),
        f"--temp-dir={temp}",
        "--num-cpus=1",
        "--object-store-memory=80000000",
        "--include-dashboard=false",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))  # as .env gives the stack its token
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        health = [str(VENV_BIN / "ray"), "status", f"--address=127.0.0.1:{port}"]
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, "ray start --head exited"
            if subprocess.run(health, env=env, capture_output=True, timeout=60).returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not answer `ray status` (the compose health check)")
    finally:
        stop(proc, timeout=60)
        leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and temp in _cmdline(p)]
        shutil.rmtree(temp, ignore_errors=True)
    assert leftover == [], "Ray processes outlived the head node"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
