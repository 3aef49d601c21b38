"""The pinned environment: every engine quill uses imports together, at the locked versions, and the
Prefect server (the one that breaks with FastAPI >= 0.156) really starts."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.paths import REPO, VENV_BIN, free_port

ENGINES = [
    "torch",
    "pytorch_lightning",
    "mlflow",
    "prefect",
    "dvc",
    "ray",
    "ray.serve",
    "tokenizers",
    "datasketch",
    "lm_eval",
    "transformers",
    "safetensors",
    "openai",
    "fastapi",
    "charset_normalizer",
    "sacrebleu",
    "rouge_score",
    "matplotlib",
]


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_engines_import_together():
    for name in ENGINES:
        importlib.import_module(name)


def test_installed_versions_match_the_lock():
    pins = locked_versions()
    assert pins["torch"].startswith("2.13.0") and pins["fastapi"] == "0.153.0" and pins["prefect"] == "3.8.8"
    wrong = {
        name: (version, md.version(name))
        for name, version in pins.items()
        if name not in {"torch"} and md.version(name) != version
    }
    assert not wrong, f"installed versions differ from requirements.lock (run `make setup`): {wrong}"
    assert md.version("torch").split("+")[0] == pins["torch"].split("+")[0]


@pytest.mark.integration
def test_prefect_server_starts_and_answers(tmp_path: Path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
    }
    server = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert server.poll() is None, f"prefect server exited:\n{server.stdout.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    assert response.read().strip() == b"true"
                    return
            except OSError:
                time.sleep(1)
        pytest.fail("prefect server did not answer /api/health within 120 s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
