"""A tiny quill workspace (a git repo copy whose whole pipeline runs in about a minute) and a real Prefect server,
for the orchestration tests (tests/integration/test_flows*.py, test_make_run.py)."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.helpers.corpus import make_verse
from tests.helpers.paths import REPO, VENV_BIN, free_port

# Parameters that make `dvc repro` of all six stages take about a minute on 2 CPU cores.
TINY_PARAMS = {
    "data": {
        "sources": [{"type": "local", "path": "corpus"}],
        "min_chars": 50,
        "split": {"passage_chars": 400, "val": 0.1, "test": 0.1},
    },
    "tokenizer": {"vocab_size": 400},
    "model": {"preset": "tiny"},
    "train": {
        "max_steps": 8,
        "batch_size": 4,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "val_every": 4,
        "val_batches": 2,
        "log_every": 2,
        "checkpoint_every": 4,
        "seed": 7,
    },
    "eval": {
        "num_fewshot": [0],
        "max_items": 4,
        "batch_size": 8,
        "stride": 32,
        "sample_prompts": ["The king"],
        "samples_from_test": 1,
        "sample_max_tokens": 4,
    },
    "registry": {"model_name": "quill-test"},
}
COPIED = ("pipelines", "model", "flows")
COPIED_FILES = ("dvc.yaml", ".dvcignore", "Makefile", ".gitignore", "requirements.lock")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def tiny_workspace(root: Path, serve_port: int | None = None) -> Path:
    """A committed git repo at `root` holding quill's code, dvc.yaml and a tiny params.yaml over a fixture corpus
    (serving on `serve_port`, a free one by default)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in COPIED_FILES:
        shutil.copy2(REPO / name, root / name)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PARAMS)
    params["serve"]["port"] = serve_port or free_port()
    (root / "params.yaml").write_text("# tiny test params\n" + yaml.safe_dump(params, sort_keys=False))
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n    autostage = false\n")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(40):  # verse: the evaluate stage's cloze and next-line items need lines
        (root / "corpus" / f"verse_{i:03d}.txt").write_text(make_verse(rng), encoding="utf-8")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny workspace"], cwd=root, check=True)
    return root


def quill_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment a user has in `root`: the venv on PATH, the copy's own modules, its own MLflow store."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        **extra,
    }
    env.pop("PYTHONPATH", None)
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """Settings for a throwaway Prefect server (and its clients) whose database lives in `home`."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until `url` answers 200 (or `proc` exits, or the timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on a free loopback port; yields the env that points clients at it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(home, port)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc)
        yield env
    finally:
        stop(proc)
        log.close()


@contextmanager
def ray_head() -> Iterator[dict[str, str]]:
    """A private `ray start --head --block` (token auth, its own temp dir and port); yields the env that joins it.

    Tests join it through RAY_ADDRESS so the serve CLI never joins, or shuts down, another Ray on the machine.
    """
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head_env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    head_env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--block",
        ],
        env=head_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        status = [str(VENV_BIN / "ray"), "status", f"--address={env['RAY_ADDRESS']}"]
        while subprocess.run(status, env=head_env, capture_output=True, timeout=60).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError("ray start --head did not come up")
            time.sleep(2)
        yield env
    finally:
        stop(proc, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
