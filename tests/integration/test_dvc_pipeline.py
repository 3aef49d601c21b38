"""`dvc repro` on a fixture corpus, in a temporary copy of the repository: real DVC, real stages. The data stages\nrun once per module; each test changes its own copy of the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.summary import summary_rows
from tests.helpers.corpus import write_corpus
from tests.helpers.paths import REPO, VENV_BIN
from tests.helpers.workspace import copy_workspace

pytestmark = pytest.mark.integration

DATA_STAGES = ("ingest", "clean", "tokenize")
# Only the data stages run here: naming their metrics keeps DVC from warning (on stdout) about the
# train/eval metrics files that do not exist yet.
DATA_METRICS = ("metrics/clean.json", "metrics/tokenize.json")


def dvc(cwd: Path, *args: str, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)  # the copy's own modules must run, as for a user
    result = subprocess.run(
        [str(VENV_BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, key = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(output: str) -> set[str]:
    return {s for s in DATA_STAGES if f"Running stage '{s}'" in output}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """A copy of the repository (code, dvc.yaml, params.yaml) whose corpus is a small local fixture folder, its
    data stages reproduced once, committed; with the output of that `dvc repro`. Tests work on copies of it."""
    root = tmp_path_factory.mktemp("repo") / "repo"
    for name in ("pipelines", "model"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n    autostage = false\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    write_corpus(root / "corpus", n_docs=30)
    set_param(root, "data.sources", [{"type": "local", "path": "corpus"}])
    set_param(root, "data.min_chars", 50)
    set_param(root, "data.split.passage_chars", 400)
    set_param(root, "data.split.val", 0.1)
    set_param(root, "data.split.test", 0.1)
    set_param(root, "tokenizer.vocab_size", 400)
    output = dvc(root, "repro", "tokenize")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], cwd=root, check=True
    )
    return root, output


@pytest.fixture
def repo(built, tmp_path) -> Path:
    """This test's own copy of the built repository."""
    return copy_workspace(built[0], tmp_path / "repo")


def test_repro_builds_the_data_stages_and_metrics(built):
    repo, output = built
    assert stages_run(output) == set(DATA_STAGES)
    for path in (
        "data/raw/manifest.json",
        "data/clean/train.jsonl",
        "data/clean/val.jsonl",
        "data/clean/test.jsonl",
        "data/tokenizer/tokenizer.json",
        "data/tokens/train.bin",
        "data/tokens/meta.json",
    ):
        assert (repo / path).is_file(), path
    metrics = json.loads(dvc(repo, "metrics", "show", "--json", *DATA_METRICS, stdout_only=True))
    files = metrics[""]["data"]
    assert {"docs_in", "docs_out", "exact_duplicates", "near_duplicates", "quarantined"} <= set(
        files["metrics/clean.json"]["data"]
    )
    tok = files["metrics/tokenize.json"]["data"]
    clean = json.loads((repo / "metrics" / "clean.json").read_text())
    assert clean["docs_in"] == 30 + 1 + 5  # 30 .txt, notes.md, 5 jsonl lines
    assert clean["docs_in"] == (
        clean["docs_out"]
        + clean["exact_duplicates"]
        + clean["near_duplicates"]
        + sum(clean["dropped"].values())
        + clean["quarantined"]
    )
    assert tok["tokens"]["train"] > 0 and tok["vocab_size"] <= 400 and len(tok["tokenizer_sha256"]) == 64
    # what `make run` prints at the end, from the files the stages just wrote
    rows = dict(summary_rows(repo))
    assert rows["clean"].startswith(f"{clean['docs_out']} of 36 documents kept")
    assert rows["tokenize"].startswith(f"vocab {tok['vocab_size']},") and rows["train"] == "not run yet (dvc repro)"


def test_second_repro_does_nothing(repo: Path):
    output = dvc(repo, "repro", "tokenize")
    assert stages_run(output) == set(), output
    assert "Data and pipelines are up to date" in output


def test_changing_a_split_param_reruns_only_what_depends_on_it(repo: Path):
    before = json.loads((repo / "metrics" / "clean.json").read_text())
    set_param(repo, "data.split.val", 0.3)
    output = dvc(repo, "repro", "tokenize")
    assert stages_run(output) == {"clean", "tokenize"}, output
    after = json.loads((repo / "metrics" / "clean.json").read_text())
    assert after["splits"]["val"]["docs"] > before["splits"]["val"]["docs"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["clean"]["params"]["params.yaml"]["data.split"]["val"] == 0.3
    assert "data.split" not in lock["stages"]["tokenize"]["params"]["params.yaml"]


def test_changing_the_vocab_reruns_only_tokenize(repo: Path):
    set_param(repo, "tokenizer.vocab_size", 350)
    output = dvc(repo, "repro", "tokenize")
    assert stages_run(output) == {"tokenize"}, output
    assert json.loads((repo / "metrics" / "tokenize.json").read_text())["vocab_size"] <= 350


def test_metrics_diff_against_the_last_commit(repo: Path):
    set_param(repo, "tokenizer.vocab_size", 300)
    dvc(repo, "repro", "tokenize")
    diff = json.loads(dvc(repo, "metrics", "diff", "--json", "--targets", *DATA_METRICS, stdout_only=True))
    assert "vocab_size" in json.dumps(diff["metrics/tokenize.json"])
