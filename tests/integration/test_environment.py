"""The pinned environment: every engine quill uses imports together, at the locked versions, and the
Prefect server (the one that breaks with FastAPI >= 0.156) really starts."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

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


def test_engines_import_together_from_the_venv():
    """All of them in one process (a clash of their pins shows as an ImportError here), each from the virtual
    environment `make setup` built, never from a copy elsewhere on the machine."""
    site = Path(sysconfig.get_path("purelib")).resolve()
    outside = {}
    for name in ENGINES:
        module = importlib.import_module(name)
        if not Path(module.__file__).resolve().is_relative_to(site):
            outside[name] = module.__file__
    assert not outside, f"imported from outside {site}: {outside}"


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
def test_prefect_server_starts_and_answers(prefect):
    """The session's Prefect server (tests/conftest.py) is the pinned Prefect with the pinned FastAPI."""
    with urllib.request.urlopen(f"{prefect['PREFECT_API_URL']}/health", timeout=30) as response:
        assert response.read().strip() == b"true"
