"""docker-compose.yml without a Docker engine: validated against the Compose specification's schema, checked for
what the team stack promises (pinned images, health checks, healthy dependencies, no default secrets, each service
only the accounts it needs), and the commands of its mlflow, prefect and ray-head services started for real on
loopback ports: they are the session's shared services (tests/conftest.py), started from those commands. The
mlflow-users one-shot's command runs against that MLflow server."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.common.contracts import HF_MODEL_PATH
from pipelines.serve import HIGH_THROUGHPUT_ENV
from pipelines.serve.source import fetch, resolve
from tests.helpers.paths import REPO, VENV_BIN
from tests.helpers.services import COMPOSE, MLFLOW_ADMIN, compose_command

SERVICES = COMPOSE["services"]

# Least privilege: the .env variables each service sees (in its environment, command or the configs it mounts).
# Settings that are no credential (image tag, torch build, bind address, the UI's API URL) are left out.
CREDENTIALS = {
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
    "minio-buckets": {
        *("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_MLFLOW_USER", "MINIO_MLFLOW_PASSWORD"),
        *("MINIO_DVC_USER", "MINIO_DVC_PASSWORD"),
    },
    "mlflow": {
        *("POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_ADMIN_USER", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"),
        *("MINIO_MLFLOW_USER", "MINIO_MLFLOW_PASSWORD"),
    },
    "mlflow-users": {
        *("MLFLOW_ADMIN_USER", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_WORKER_USER", "MLFLOW_WORKER_PASSWORD"),
        *("MLFLOW_SERVING_USER", "MLFLOW_SERVING_PASSWORD"),
    },
    "prefect": {"POSTGRES_USER", "POSTGRES_PASSWORD", "PREFECT_AUTH_STRING"},
    # answers untrusted HTTP: Ray's token, the endpoint's key, MLflow's read-only account; no Prefect, no S3
    "ray-head": {"RAY_AUTH_TOKEN", "QUILL_API_KEY", "MLFLOW_SERVING_USER", "MLFLOW_SERVING_PASSWORD"},
    "prefect-worker": {
        *("MLFLOW_WORKER_USER", "MLFLOW_WORKER_PASSWORD", "PREFECT_AUTH_STRING", "RAY_AUTH_TOKEN", "QUILL_API_KEY"),
        *("MINIO_DVC_USER", "MINIO_DVC_PASSWORD"),
    },
}
NOT_CREDENTIALS = {"QUILL_IMAGE_TAG", "TORCH_VARIANT", "QUILL_BIND_ADDRESS", "PREFECT_UI_API_URL"}


def strings(node: object) -> Iterator[str]:
    """Every string value in a parsed YAML node (mapping keys are names, not values)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def credentials_of(name: str) -> set[str]:
    """The .env variables that Compose interpolates into service `name` and the configs it mounts ($$ escapes one
    for the container's own shell, which sees only what its environment holds)."""
    service = SERVICES[name]
    texts = [*strings(service), *(COMPOSE["configs"][c["source"]]["content"] for c in service.get("configs", []))]
    return {var for text in texts for var in re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text)} - NOT_CREDENTIALS


def holders(prefix: str) -> set[str]:
    return {name for name in SERVICES if any(var.startswith(prefix) for var in credentials_of(name))}


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


def test_each_service_gets_only_the_accounts_it_needs():
    assert {name: credentials_of(name) for name in SERVICES} == CREDENTIALS
    assert holders("MINIO_ROOT_") == {"minio", "minio-buckets"}  # the root account never leaves MinIO's side
    assert holders("MLFLOW_ADMIN_") == {"mlflow", "mlflow-users"}  # the server's auth config and the one-shot
    env = {name: service.get("environment", {}) for name, service in SERVICES.items()}
    # S3 keys: the MLflow server's to bucket mlflow, the worker's to bucket dvc; clients use MLflow's artifact proxy
    keys = {name: e["AWS_ACCESS_KEY_ID"] for name, e in env.items() if "AWS_ACCESS_KEY_ID" in e}
    assert keys == {
        "mlflow": "${MINIO_MLFLOW_USER:?set MINIO_MLFLOW_USER in .env}",
        "prefect-worker": "${MINIO_DVC_USER:?set MINIO_DVC_USER in .env}",
    }
    assert "--serve-artifacts" in SERVICES["mlflow"]["command"]
    users = {name: e["MLFLOW_TRACKING_USERNAME"] for name, e in env.items() if "MLFLOW_TRACKING_USERNAME" in e}
    assert users == {
        "mlflow-users": "${MLFLOW_ADMIN_USER:?set MLFLOW_ADMIN_USER in .env}",
        "ray-head": "${MLFLOW_SERVING_USER:?set MLFLOW_SERVING_USER in .env}",
        "prefect-worker": "${MLFLOW_WORKER_USER:?set MLFLOW_WORKER_USER in .env}",
    }
    head = env["ray-head"]
    assert not [key for key in head if key.startswith(("AWS_", "MLFLOW_S3_", "PREFECT_"))], sorted(head)


def test_each_minio_key_reads_and_writes_only_its_bucket():
    command = SERVICES["minio-buckets"]["command"][0]
    mounted = {c["source"]: c["target"] for c in SERVICES["minio-buckets"]["configs"]}
    for bucket in ("mlflow", "dvc"):
        policy = json.loads(COMPOSE["configs"][f"minio-policy-{bucket}"]["content"])
        resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
        actions = {a for statement in policy["Statement"] for a in statement["Action"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, resources
        # object reads and writes, listing: no wildcard, nothing that changes or deletes the bucket itself
        assert not [a for a in actions if "*" in a or a.startswith(("s3:DeleteBucket", "s3:PutBucket"))], actions
        assert {statement["Effect"] for statement in policy["Statement"]} == {"Allow"}
        user = f'"$$MINIO_{bucket.upper()}_USER"'
        assert f"mc admin policy create quill quill-{bucket} {mounted[f'minio-policy-{bucket}']}" in command
        assert f"mc admin policy attach quill quill-{bucket} --user {user}" in command
        assert f"mc admin user add quill {user} " in command


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


def refused(call) -> None:
    """`call` is answered 403 (MLflow's client raises PERMISSION_DENIED for it)."""
    with pytest.raises(MlflowException) as refusal:
        call()
    assert refusal.value.error_code == "PERMISSION_DENIED", refusal.value


@pytest.mark.integration
def test_the_mlflow_users_one_shot_lets_the_worker_write_and_the_ray_head_only_read(
    mlflow_http, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """mlflow-users' own command, run as the admin against the session's server (the compose mlflow command), makes
    the worker's account and puts back the serving one, found as a rerun of `docker compose up` may find it: an older
    password and a role that was given a write. The worker creates an experiment, logs a run, registers a model and
    sets its alias; the serving account (the Ray head's) resolves that alias and downloads the model as a replica
    does, through the artifact proxy, and every write it tries is refused."""
    uri = mlflow_http["uri"]
    accounts = {"WORKER": "quill-worker", "SERVING": "quill-serving"}
    passwords = {account: secrets.token_hex(12) for account in accounts}

    def as_admin(path: str, body: dict) -> dict:  # MLflow's auth REST API (mlflow.server.auth.routes)
        answer = httpx.post(f"{uri}/api/{path}", json=body, auth=MLFLOW_ADMIN, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    as_admin("2.0/mlflow/users/create", {"username": accounts["SERVING"], "password": "an-older-password"})
    role = as_admin("3.0/mlflow/roles/create", {"workspace": "default", "name": "quill-serving"})["role"]["id"]
    grant = {"role_id": role, "resource_type": "registered_model", "resource_pattern": "*", "permission": "EDIT"}
    as_admin("3.0/mlflow/roles/permissions/add", grant)
    as_admin("3.0/mlflow/roles/assign", {"username": accounts["SERVING"], "role_id": role})

    env = {
        **os.environ,
        **{key: value for key, value in mlflow_http.items() if key.startswith("MLFLOW_")},  # as the admin
        **{f"MLFLOW_{account}_USER": user for account, user in accounts.items()},
        **{f"MLFLOW_{account}_PASSWORD": password for account, password in passwords.items()},
    }
    assert set(SERVICES["mlflow-users"]["environment"]) <= set(env)  # everything compose gives the command
    users = subprocess.run(compose_command("mlflow-users"), env=env, capture_output=True, text=True, timeout=120)
    assert users.returncode == 0, users.stdout + users.stderr

    def login(account: str) -> MlflowClient:  # MLflow's clients read the account from the environment per request
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", accounts[account])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords[account])
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    name = f"least-privilege-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "pyfunc" / HF_MODEL_PATH
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"n_layer": 2}')
    worker = login("WORKER")
    experiment_id = worker.create_experiment(name)
    run = worker.create_run(experiment_id)
    worker.log_metric(run.info.run_id, "val_loss", 1.5)
    worker.log_artifacts(run.info.run_id, str(tmp_path / "pyfunc"), "pyfunc")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # the proxy: no S3 key
    worker.set_terminated(run.info.run_id)
    worker.create_registered_model(name)
    try:
        version = worker.create_model_version(name, f"{run.info.artifact_uri}/pyfunc", run_id=run.info.run_id)
        worker.set_registered_model_alias(name, "champion", version.version)

        serving = login("SERVING")
        source = resolve(f"models:/{name}@champion", uri)  # what the serve CLI and a replica do with the account
        assert (source.name, source.version) == (name, version.version)
        assert (fetch(source, uri) / "config.json").read_text() == '{"n_layer": 2}'
        refused(lambda: serving.create_registered_model(f"{name}-by-serving"))
        refused(lambda: serving.create_model_version(name, f"{run.info.artifact_uri}/pyfunc", run_id=run.info.run_id))
        refused(lambda: serving.set_registered_model_alias(name, "champion", version.version))
        refused(lambda: serving.create_experiment(f"{name}-by-serving"))
        refused(lambda: serving.create_run(experiment_id))
        refused(lambda: serving.log_metric(run.info.run_id, "val_loss", 0.1))
        # nor can it replace the stored model's files (which loading a pyfunc model would run)
        stored = f"{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/pyfunc/{HF_MODEL_PATH}/config.json"
        serving_auth = (accounts["SERVING"], passwords["SERVING"])
        put = httpx.put(
            f"{uri}/api/2.0/mlflow-artifacts/artifacts/{stored}", content=b"{}", auth=serving_auth, timeout=60
        )
        assert put.status_code == 403, put.text
        # the password is .env's again: the older one no longer logs in
        get = f"{uri}/api/2.0/mlflow/registered-models/get"
        older_auth = (accounts["SERVING"], "an-older-password")
        assert httpx.get(get, params={"name": name}, auth=older_auth, timeout=60).status_code == 401
    finally:  # the session's registry holds only what the tests that count its models made
        login("WORKER").delete_registered_model(name)


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
