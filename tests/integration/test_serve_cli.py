"""`python -m pipelines.serve` refusing a bad model (or chat model) before it starts anything, as a user runs it from a
project folder with a private TMPDIR (so any Ray it started would be found: its processes all inherit TMPDIR).

Deploying, status, a rolling redeploy of other model folders, the metrics and HAProxy URLs it prints and
shutdown run against the local Ray that `make run` starts: tests/integration/test_make_run.py."""

from __future__ import annotations

import os

import pytest

from tests.helpers.paths import free_port, run_module
from tests.helpers.services import copy_store, ray_processes
from tests.helpers.serving import ray_env, ray_tmpdir, tiny_model_folder, write_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mlflow_template):
    """A project folder with params.yaml (a free serve.port), a model folder, an empty migrated MLflow store, the CLI's
    environment."""
    root = tmp_path_factory.mktemp("serve-cli")
    write_params(root / "params.yaml", port=free_port(), max_batch_size=4)
    tiny_model_folder(root, seed=0, name="base")
    with ray_tmpdir() as tmp:
        env = {**ray_env(tmp), "MLFLOW_TRACKING_URI": copy_store(mlflow_template, root)}
        yield {"root": root, "tmp": tmp, "env": env}


def cli(w, *args):
    return run_module("pipelines.serve", w["root"], *args, env=w["env"], timeout=300)


def mine(w) -> list:
    return [p for p in ray_processes(w["tmp"]) if p.pid != os.getpid()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no/such/folder"], "no/such/folder: not a model folder (no config.json) and not a models:/ URI"),
        (["--model", "models:/nope@champion"], "models:/nope@champion: not found in the registry"),
        (["--model", "base", "--chat-model", "models:/nope/2"], "models:/nope/2: not found in the registry"),
    ],
    ids=["folder", "registry", "chat"],
)
def test_a_bad_model_is_one_error_line_and_starts_nothing(workdir, args, message):
    r = cli(workdir, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("serve: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"serve: error: {message}"), r.stderr
    assert r.stderr.rstrip().endswith(errors[0])  # the last thing printed
    assert not mine(workdir)  # resolved before any Ray is started
