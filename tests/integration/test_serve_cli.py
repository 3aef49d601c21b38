"""`python -m pipelines.serve` end to end, as a user runs it from a project folder: deploy a local model (the CLI
starts its own Ray), status, a rolling redeploy of another model, shutdown, and that nothing it started is left.
The CLI runs with a private TMPDIR, so its Ray and its state file are this test's alone and every process of
that Ray can be found afterwards (they all inherit TMPDIR)."""

from __future__ import annotations

import os
import re

import httpx
import pytest

from tests.helpers.paths import free_port, run_module
from tests.helpers.serving import (
    listener,
    ray_env,
    ray_processes,
    ray_tmpdir,
    tiny_model_folder,
    wait_for,
    write_params,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A project folder with params.yaml (a free serve.port), two model folders, and the CLI's environment."""
    root = tmp_path_factory.mktemp("serve-cli")
    port = free_port()
    write_params(root / "params.yaml", port=port, max_batch_size=4)
    alpha = tiny_model_folder(root / "a", seed=0, name="alpha")
    beta = tiny_model_folder(root / "b", seed=1, name="beta")
    with ray_tmpdir() as tmp:
        env = {**ray_env(tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        yield {"root": root, "url": f"http://127.0.0.1:{port}", "alpha": alpha, "beta": beta, "tmp": tmp, "env": env}


def cli(w, *args):
    return run_module("pipelines.serve", w["root"], *args, env=w["env"], timeout=300)


def mine(w) -> list:
    return [p for p in ray_processes(w["tmp"]) if p.pid != os.getpid()]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no/such/folder", "no/such/folder: not a model folder (no config.json) and not a models:/ URI"),
        ("models:/nope@champion", "models:/nope@champion: not found in the registry"),
    ],
    ids=["folder", "registry"],
)
def test_a_bad_model_is_one_error_line_and_starts_nothing(workdir, model, message):
    r = cli(workdir, "--model", model)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("serve: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"serve: error: {message}"), r.stderr
    assert r.stderr.rstrip().endswith(errors[0])  # the last thing printed
    assert not mine(workdir)  # resolved before any Ray is started


def test_deploy_status_redeploy_shutdown(workdir):
    w, url = workdir, workdir["url"]
    r = cli(w, "--model", str(w["alpha"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"serve: alpha (version local, {w['alpha']}) at {url}/v1" in r.stdout
    assert "python -m pipelines.serve shutdown" in r.stdout
    metrics = re.search(r"Prometheus metrics (http://\S+/metrics)", r.stdout)
    assert metrics, r.stdout
    assert "high-throughput mode (HAProxy ingress)" in r.stdout  # serve.high_throughput: true, the default
    assert listener(int(url.rsplit(":", 1)[1])) == "haproxy"
    stats = re.search(r"HAProxy stats (http://\S+/stats)", r.stdout)
    assert stats, r.stdout
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok", "model": "alpha", "version": "local"}
        done = http.post("/v1/completions", json={"prompt": "To be", "max_tokens": 4, "ignore_eos": True}).json()
        assert done["model"] == "alpha" and done["usage"]["completion_tokens"] == 4

        assert "quill" in http.get(stats[1]).text  # HAProxy's stats page names the app's backend

        r = cli(w, "status")
        assert r.returncode == 0 and "RUNNING" in r.stdout and "alpha" in r.stdout, r.stdout + r.stderr

        # a rolling update to another model; a mode the running Ray was not started with is named, not applied
        write_params(
            w["root"] / "params.yaml", port=int(url.rsplit(":", 1)[1]), max_batch_size=4, high_throughput=False
        )
        r = cli(w, "--model", str(w["beta"]))
        assert r.returncode == 0 and "rolling update" in r.stdout, r.stdout + r.stderr
        assert "the local Ray was started with serve.high_throughput: True" in r.stdout
        assert http.get("/v1/models").json()["data"][0]["id"] == "beta"
        assert http.post("/v1/completions", json={"prompt": "To be", "max_tokens": 2}).json()["model"] == "beta"
        assert "beta" in cli(w, "status").stdout

    # the metrics URL the CLI printed is Ray's Prometheus export of this node
    wait_for(lambda: "ray_quill_requests_total" in httpx.get(metrics[1], timeout=10).text, 60, "quill metrics")

    assert mine(w)  # what shutdown must stop: GCS, raylet, dashboard, Serve's controller, proxy and replica
    r = cli(w, "shutdown")
    assert r.returncode == 0 and "local Ray stopped" in r.stdout, r.stdout + r.stderr
    r = cli(w, "status")
    assert r.returncode == 1 and "not running" in r.stdout, r.stdout + r.stderr

    def gone():
        left = mine(w)
        assert not left, [(p.pid, p.name()) for p in left]
        return True

    wait_for(gone, 15, "every process of the CLI's Ray stopped")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
