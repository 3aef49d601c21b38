"""The clean stage's map step: one shard of raw files -> cleaned documents, their records and dedup rows.

`plan` cuts the sorted manifest into shards of a few MB (workers x 4 of them at least, when the corpus allows),
and `read_shard` (run by pipelines/common/engine.py, locally or on Ray) reads one shard's files as documents
(pipelines/clean/read.py), cleans each (textclean), and writes under `<scratch>/shards/<shard>/`:

    spill.bin     the cleaned text of every document, back to back
    shingles.bin  each kept document's sorted shingle set (uint32), for the exact verification of candidates
    docs.jsonl    one record per document: file, outcome (kept | dropped | quarantined, for now), reason, ...
    loc.npy       where each document's text and shingles lie in those files, by index in the shard

plus, for each document still kept, its SHA-256 (exact dedup) and its LSH band hashes (near dedup) in the
partitioned row files of pipelines/clean/shuffle.py. Nothing of a shard stays in memory once it is written.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipelines.clean import dedup, shuffle
from pipelines.clean.read import CHUNK_BYTES, Doc, Quarantine, documents, pieces
from pipelines.clean.textclean import TextCleaner, looks_like_metadata
from pipelines.common.atomic import is_out_of_space
from pipelines.common.params import DataParams

MIN_SHARD_BYTES = 16 << 20  # below this a task costs more to schedule than to run (the default corpus: one)
MAX_SHARD_BYTES = 64 << 20  # bounds a task's time, so progress moves and a retried task redoes little (a larger
# uncompressed .jsonl file is cut into line ranges, a Parquet file into runs of row groups; a compressed file is
# one task, however large)
PARTITION_BYTES = 16 << 20  # raw bytes per shuffle partition: its LSH band rows (about 3 MB) are one sort pass
FLUSH_DOCS = 4096  # documents whose dedup rows a read task holds before writing them out
LOC_ROWS = np.dtype([("offset", "<u8"), ("nbytes", "<u8"), ("shingles_at", "<u8"), ("shingles", "<u8")])
SHINGLE = np.dtype("<u4")


def plan(entries: list[dict], raw_dir: Path, params: DataParams, workers: int) -> tuple[list[list[dict]], int]:
    """Shards of manifest entries (in sorted order) and the number of shuffle partitions. With data.max_bytes,
    the files past it are left out (their documents could not be within the cap)."""
    sizes = []
    for entry in entries:
        if params.max_bytes is not None and sum(sizes) >= params.max_bytes:
            break
        path = raw_dir / entry["file"]
        sizes.append(path.stat().st_size if path.is_file() else 0)
    total = sum(sizes)
    target = min(max(total // (4 * max(workers, 1)), MIN_SHARD_BYTES), MAX_SHARD_BYTES)
    shards: list[list[dict]] = [[]]
    filled = 0
    cut = []  # a large .jsonl or Parquet file becomes several pieces, so that several tasks read it
    for entry, size in zip(entries, sizes):
        parts = pieces(raw_dir / entry["file"], target, entry.get("text_field", "text")) if size > target else None
        cut += [{**entry, "bytes": n, "part": part} for n, part in parts] if parts else [{**entry, "bytes": size}]
    for piece in cut:
        if shards[-1] and filled + piece["bytes"] > target:
            shards.append([])
            filled = 0
        shards[-1].append(piece)
        filled += piece["bytes"]
    parts = min(max(1, -(-total // PARTITION_BYTES)), 256)
    return [s for s in shards if s], parts


def shard_folder(scratch: Path, shard: int) -> Path:
    return scratch / "shards" / f"{shard:06d}"


def read_shard(task: dict) -> dict:
    """Clean one shard (a task of `plan`); returns {"docs", "raw_bytes"}: its documents and their input bytes."""
    params: DataParams = task["params"]
    raw_dir, scratch, shard = Path(task["raw"]), Path(task["scratch"]), task["shard"]
    folder = shard_folder(scratch, shard)
    folder.mkdir(parents=True)
    d = params.dedup
    bands, rows = dedup.lsh_shape(d.jaccard_threshold, d.num_perm)
    locations = array("Q")  # 4 numbers per document (LOC_ROWS), 32 bytes, not a tuple's 170
    shas, band_rows, raw_bytes, flushed, count = [], [], 0, 0, 0

    def flush() -> None:  # the rows so far to the shuffle: a shard's memory stays that of FLUSH_DOCS documents
        nonlocal shas, band_rows, flushed
        name = f"{shard:06d}-{flushed:05d}"
        sha_rows = np.array(shas, dtype=shuffle.SHA_ROWS)
        shuffle.write_partitioned(scratch / "sha", name, sha_rows, shuffle.partition_of(sha_rows["sha"], parts))
        if band_rows:
            rows_ = np.concatenate(band_rows)
            shuffle.write_partitioned(scratch / "bands", name, rows_, shuffle.partition_of(rows_["hash"], parts))
        shas, band_rows, flushed = [], [], flushed + 1

    parts = task["parts"]
    with (
        open(folder / "spill.bin", "w+b") as spill,
        open(folder / "shingles.bin", "wb") as shingle_file,
        open(folder / "docs.jsonl", "w", encoding="utf-8") as records,
    ):
        for doc in _read_files(task["files"], raw_dir, params, spill):
            index = count
            shingles_at, found = shingle_file.tell() // SHINGLE.itemsize, ()
            raw_bytes += doc.raw_bytes
            if doc.outcome == "kept":
                k = shuffle.key(shard, index)
                shas.append((bytes.fromhex(doc.sha256), k))
                shingles = dedup.Shingler(d.shingle_words)
                for chunk in read_spill(spill, doc.offset, doc.nbytes):
                    shingles.feed(chunk)
                found = shingles.finish()
                shingle_file.write(found.astype(SHINGLE).tobytes())
                if len(found):  # a document without words is never a near duplicate
                    doc_bands = np.empty(bands, dtype=shuffle.BAND_ROWS)
                    doc_bands["hash"] = dedup.band_hashes(dedup.minhash(found, d.num_perm), bands, rows)
                    doc_bands["key"] = k
                    band_rows.append(doc_bands)
                spill.seek(0, 2)
                if len(shas) >= FLUSH_DOCS:
                    flush()
            locations.extend((doc.offset, doc.nbytes, shingles_at, len(found)))
            count += 1
            records.write(json.dumps(_record(doc), ensure_ascii=False) + "\n")
            if count >= (params.max_docs or float("inf")) or raw_bytes >= (params.max_bytes or float("inf")):
                break  # this shard alone reached a cap: the stage cuts the corpus where the caps fall
    flush()
    np.save(folder / "loc.npy", np.frombuffer(locations, dtype=np.uint64).view(LOC_ROWS), allow_pickle=False)
    return {"docs": count, "raw_bytes": raw_bytes}


RECORD_FIELDS = [f.name for f in fields(Doc) if f.name not in ("offset", "nbytes")]  # those two are in loc.npy


def _record(doc: Doc) -> dict:
    return {name: getattr(doc, name) for name in RECORD_FIELDS}  # asdict's deep copies cost 7 % of the stage


def _read_files(files: list[dict], raw_dir: Path, params: DataParams, spill: BinaryIO) -> Iterator[Doc]:
    """Every document of the shard's files, cleaned into `spill`."""
    for entry in files:
        name = entry["file"]
        read = 0
        try:
            for doc, chunks in documents(
                raw_dir / name,
                name,
                entry.get("text_field", "text"),
                params.strip_html,
                params.max_file_bytes,
                entry.get("part"),
            ):
                read += 1
                start = spill.tell()
                try:
                    clean_doc(doc, chunks, params, spill)
                except Quarantine as exc:
                    quarantine(doc, str(exc))
                    _forget(spill, start, doc)
                except (OSError, EOFError, zlib.error, UnicodeError) as exc:
                    if is_out_of_space(exc):
                        raise  # writing the spill file failed: the stage stops, the document is not to blame
                    quarantine(doc, f"read_error: {type(exc).__name__}: {exc}")
                    _forget(spill, start, doc)
                yield doc
        except Quarantine as exc:
            yield quarantine(Doc(_unread(name, read, entry)), str(exc))
        except (OSError, EOFError, zlib.error, UnicodeError) as exc:
            if is_out_of_space(exc):
                raise
            yield quarantine(Doc(_unread(name, read, entry)), f"read_error: {type(exc).__name__}: {exc}")


def _unread(name: str, read: int, entry: dict) -> str:
    """The name of what a file problem left unread: the file, or its rest after the documents already read (or
    after the pieces of it before this one)."""
    part = entry.get("part")
    return f"{name}#rest" if read or (part and part[2] > 1) else name


def _forget(spill: BinaryIO, start: int, doc: Doc) -> None:
    spill.seek(start)
    spill.truncate()
    doc.offset, doc.nbytes = start, 0


def clean_doc(doc: Doc, chunks: Iterable[str], params: DataParams, spill: BinaryIO) -> None:
    """Clean one document into the spill file and set its outcome (dropped or kept, for now)."""
    cleaner = TextCleaner(params.strip_gutenberg)
    digest = hashlib.sha256()
    head: list[str] = []  # the first 64 KB of cleaned text, for the metadata check
    doc.offset = spill.tell()

    def write(text: str) -> None:
        data = text.encode("utf-8")
        spill.write(data)
        digest.update(data)
        doc.nbytes += len(data)
        doc.chars += len(text)
        if sum(map(len, head)) < 65536:
            head.append(text)

    for chunk in chunks:
        write(cleaner.feed(chunk))
    write(cleaner.finish())
    doc.sha256 = digest.hexdigest()
    doc.gutenberg = cleaner.gutenberg_stripped
    if doc.chars == 0:
        doc.outcome, doc.drop_key, doc.reason = "dropped", "empty", "empty after cleaning"
    elif doc.chars < params.min_chars:
        doc.outcome, doc.drop_key = "dropped", "too_short"
        doc.reason = f"too short: {doc.chars} characters after cleaning < data.min_chars={params.min_chars}"
    elif looks_like_metadata("".join(head)):
        doc.outcome, doc.drop_key, doc.reason = "dropped", "metadata", "INI-style metadata ([section], key = value)"


def quarantine(doc: Doc, reason: str) -> Doc:
    doc.outcome, doc.drop_key, doc.reason = "quarantined", reason.partition(": ")[0], reason
    return doc


def read_spill(spill: BinaryIO, offset: int, nbytes: int) -> Iterator[str]:
    """A document's cleaned text back from a spill file, in chunks that end between characters."""
    spill.seek(offset)
    decoder = codecs.getincrementaldecoder("utf-8")()
    left = nbytes
    while left > 0:
        block = spill.read(min(CHUNK_BYTES, left))
        left -= len(block)
        yield decoder.decode(block, final=left <= 0)
