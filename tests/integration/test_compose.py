"""docker-compose.yml without a Docker engine: validated against the Compose specification's schema, checked for
what the team stack promises (pinned images, health checks, healthy dependencies, no default secrets), and the
commands of its mlflow, prefect and ray-head services started for real on loopback ports: they are the session's
shared services (tests/conftest.py), started from those commands."""

from __future__ import annotations

import os
import re
import subprocess

import httpx
import pytest

from pipelines.serve import HIGH_THROUGHPUT_ENV
from tests.helpers.paths import REPO, VENV_BIN
from tests.helpers.services import COMPOSE, MLFLOW_ADMIN, compose_command

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
    secret = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN|AUTH_STRING")
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


def test_published_ports_bind_loopback_and_prefect_asks_for_credentials():
    """On a shared host nothing is reachable from other machines unless QUILL_BIND_ADDRESS says so, and the Prefect
    API (which can run any flow with any overrides) wants the credentials its clients in the stack send."""
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("${QUILL_BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} on every interface"
    auth = "${PREFECT_AUTH_STRING:?set PREFECT_AUTH_STRING (user:password) in .env}"
    assert SERVICES["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == auth
    assert SERVICES["prefect-worker"]["environment"]["PREFECT_API_AUTH_STRING"] == auth


def test_the_ray_head_starts_ray_serve_in_the_high_throughput_mode_quill_uses():
    env = SERVICES["ray-head"]["environment"]
    assert {k: env.get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV  # as serve.high_throughput starts Ray


@pytest.mark.integration
def test_the_mlflow_service_command_serves_artifacts_behind_basic_auth(mlflow_http):
    """The session's tracking server runs the compose file's command (tests/helpers/services.py)."""
    url = f"{mlflow_http['uri']}/api/2.0/mlflow/experiments/search"
    assert httpx.post(url, json={"max_results": 1}, timeout=60).status_code == 401
    ok = httpx.post(url, json={"max_results": 1}, auth=MLFLOW_ADMIN, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.integration
def test_the_prefect_service_command_answers(prefect):
    port = prefect["PREFECT_API_URL"].split(":")[-1].split("/")[0]
    assert prefect["PREFECT_TEST_COMMAND"] == " ".join(compose_command("prefect", host="127.0.0.1", port=port))
    assert httpx.get(f"{prefect['PREFECT_API_URL']}/health", timeout=30).json() is True  # probes stay open
    # the API itself wants the stack's credentials
    assert httpx.post(f"{prefect['PREFECT_API_URL']}/flows/filter", json={}, timeout=30).status_code == 401
    user, password = prefect["PREFECT_API_AUTH_STRING"].split(":", 1)
    authed = httpx.post(f"{prefect['PREFECT_API_URL']}/flows/filter", json={}, auth=(user, password), timeout=30)
    assert authed.status_code == 200, authed.text


@pytest.mark.integration
def test_the_ray_head_command_starts_a_cluster(shared_ray):
    """The session's Ray runs the compose file's head command with its token auth; that none of its processes is
    left is asserted when the session stops it (tests/helpers/services.py: ray_cluster)."""
    compose = compose_command("ray-head", port=shared_ray["address"].rsplit(":", 1)[1], dashboard_host="127.0.0.1")
    assert shared_ray["command"][: len(compose)] == compose
    health = [str(VENV_BIN / "ray"), "status", f"--address={shared_ray['address']}"]  # the compose health check
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **shared_ray["env"]}
    assert subprocess.run(health, env=env, capture_output=True, timeout=60).returncode == 0
    without_token = {**env, "RAY_AUTH_MODE": "disabled"}
    without_token.pop("RAY_AUTH_TOKEN")
    assert subprocess.run(health, env=without_token, capture_output=True, timeout=60).returncode != 0
