"""Every stage runs against another project root (`--root DIR`): its params.yaml, inputs and outputs, nothing
written where the command runs."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.common.layout import PROJECT
from tests.helpers.corpus import write_corpus
from tests.helpers.paths import run_module


def test_data_stages_read_and_write_under_the_root(tmp_path: Path):
    root, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_corpus(root / "corpus")  # a relative local source is from the root, not from where the command runs
    (root / "params.yaml").write_text(
        "data:\n  sources:\n    - {type: local, path: corpus}\n  min_chars: 50\ntokenizer: {vocab_size: 300}\n"
    )
    for stage in ("ingest", "clean", "tokenize"):
        result = run_module(f"pipelines.{stage}", elsewhere, "--root", str(root), check=True)
        assert result.stdout.startswith(f"{stage}: "), result.stdout
    layout = PROJECT.under(root)
    assert (layout.raw / "manifest.json").is_file() and (layout.clean / "test.jsonl").is_file()
    assert json.loads(layout.tokenize_metrics.read_text())["vocab_size"] == 300
    assert (layout.tokens / "meta.json").is_file() and (layout.tokenizer / "tokenizer.json").is_file()
    assert list(elsewhere.iterdir()) == []


def test_a_root_that_is_not_a_folder_is_refused_in_one_line(tmp_path: Path):
    result = run_module("pipelines.clean", tmp_path, "--root", str(tmp_path / "missing"))
    assert result.returncode == 2 and "--root" in result.stderr and "no such folder" in result.stderr
    assert "Traceback" not in result.stderr
