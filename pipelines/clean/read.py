"""Reading raw corpus files as documents: one per text/HTML file, one per line of a .jsonl file, one per row of a
.parquet file.

`documents(path, name, text_field, strip_html, max_bytes)` yields (Doc, text chunks) for each document of one
raw file, decoding as it goes (BOMs, UTF-16, UTF-8, legacy encodings via charset-normalizer); the clean stage
(both engines) calls it for every file. Text, HTML and JSONL files may be compressed (.gz, .zst) and are
streamed. A compressed text/HTML file (one document, capped at max_bytes) is first decompressed once whole, so
that a bomb or a damaged stream is quarantined before any of it is read; a compressed JSONL file is not (its
lines are capped one by one, and reading it twice would double the cost of a large corpus): a damaged stream is
found where streaming reaches it, and what is left of the file is quarantined. Parquet files are read a record
batch at a time, only the `text_field` column. A file or document that cannot be read as text raises Quarantine
with the reason, which the stage reports.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from pipelines.clean.textclean import HEAD_BYTES, binary_reason, detect_encoding, html_to_text, looks_like_html
from pipelines.common.atomic import is_out_of_space

CHUNK_BYTES = 1 << 20  # raw bytes read at a time
# zstd input fed to one decompress call while reading a .zst file: zstd expands at most ~32,000x (an RLE block),
# so one call makes at most ~8 MiB however hostile the file
ZSTD_PIECE = 256
PARQUET_BATCH_ROWS = 64  # Parquet rows decoded at a time: few, as one row may hold a whole book


class Quarantine(Exception):
    """This document (or file) cannot be read as text; the message is the reason."""


@dataclass
class Doc:
    """One input document and what happened to it."""

    file: str  # path under data/raw, plus "#L<line>" for a .jsonl line or "#R<row>" for a .parquet row
    outcome: str = "kept"  # kept | duplicate | near_duplicate | dropped | quarantined
    reason: str = ""
    duplicate_of: str | None = None
    chars: int = 0  # characters after cleaning
    encoding: str | None = None
    html: bool = False
    gutenberg: bool = False
    offset: int = field(default=0, repr=False)  # where the cleaned text lies in the spill file
    nbytes: int = field(default=0, repr=False)
    sha256: str = field(default="", repr=False)
    drop_key: str = field(default="", repr=False)  # key in metrics["dropped"] / ["quarantine_reasons"]
    # input bytes this document accounts for (data.max_bytes): its file's size on disk, or the UTF-8 size of its
    # JSONL line or Parquet value
    raw_bytes: int = field(default=0, repr=False)


# --- reading raw files into documents -------------------------------------------------------------


def _compression(name: str) -> str | None:
    """The compression of a whole file, judged from its name: "gz", "zst" or None."""
    suffix = name.lower().rpartition(".")[2]
    return suffix if suffix in ("gz", "zst") else None


def _kind(name: str) -> str:
    name = name.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".html", ".htm")):
        return "html"
    return "text"


class _Blocks(io.RawIOBase):
    """A binary stream over a generator of byte blocks (a decompressor written as a generator), read through
    io.BufferedReader like any file."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        while not self._pending:
            block = next(self._blocks, None)
            if block is None:
                return 0
            self._pending = memoryview(block)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._blocks.close()  # closes the file it reads
        super().close()


def _gzip_blocks(path: Path) -> Iterator[bytes]:
    """The gunzipped bytes of a file; a truncated or corrupt stream raises Quarantine (bad_gzip) where reading
    reaches the damage."""
    try:
        with gzip.open(path, "rb") as stream:
            while block := stream.read(CHUNK_BYTES):
                yield block
    except (EOFError, OSError, zlib.error) as exc:
        if is_out_of_space(exc):
            raise
        raise Quarantine(f"bad_gzip: truncated or corrupt gzip ({exc})") from None


def _zstd_blocks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file, frame after frame (zstd -T and concatenated files make several); a
    corrupt stream, or one that ends inside a frame, raises Quarantine (bad_zstd) where reading reaches it. Not
    with zstandard's stream reader: it takes a stream that ends inside a frame without a word."""
    dctx = zstandard.ZstdDecompressor()
    frame = None
    try:
        with open(path, "rb") as stream:
            while block := stream.read(CHUNK_BYTES):
                view = memoryview(block)
                for start in range(0, len(view), ZSTD_PIECE):
                    piece = view[start : start + ZSTD_PIECE]
                    while piece:
                        if frame is None or frame.eof:
                            frame = dctx.decompressobj()
                        if out := frame.decompress(piece):
                            yield out
                        piece = frame.unused_data if frame.eof else b""  # the next frame's first bytes
    except zstandard.ZstdError as exc:
        raise Quarantine(f"bad_zstd: corrupt zstd ({exc})") from None
    if frame is None or not frame.eof:
        raise Quarantine("bad_zstd: truncated zstd (the file ends inside a frame)")


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed if its name says so."""
    compression = _compression(path.name)
    if compression is None:
        return open(path, "rb")
    blocks = _gzip_blocks(path) if compression == "gz" else _zstd_blocks(path)
    return io.BufferedReader(_Blocks(blocks), CHUNK_BYTES)


def _too_large(what: str, max_bytes: int) -> Quarantine:
    return Quarantine(f"too_large: {what} more than data.max_file_bytes={max_bytes} bytes")


def _check_whole(path: Path, max_bytes: int) -> None:
    """Decompress a compressed text/HTML file (one document) once, so that an oversized (a decompression bomb),
    truncated or corrupt one is quarantined before any of it is read."""
    verb = "gunzips" if _compression(path.name) == "gz" else "unzstds"
    total = 0
    with _open(path) as stream:
        while block := stream.read(CHUNK_BYTES):
            total += len(block)
            if total > max_bytes:
                raise _too_large(f"{verb} to", max_bytes)


def _sniff(stream: BinaryIO) -> tuple[bytes, str]:
    """First bytes of a stream and their encoding, or Quarantine if they are binary or undecodable."""
    head = stream.read(HEAD_BYTES)
    reason = binary_reason(head)
    if reason:
        raise Quarantine(reason)
    encoding = detect_encoding(head)
    if encoding is None:
        raise Quarantine("undecodable: no text encoding fits the first bytes")
    return head, encoding


def _decoded(stream: BinaryIO, head: bytes, encoding: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    yield decoder.decode(head)
    for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
        yield decoder.decode(block)
    yield decoder.decode(b"", final=True)


def _text_doc(path: Path, doc: Doc, strip_html: bool, max_bytes: int) -> Iterator[str]:
    """The decoded text of one text/HTML file, in chunks; sets doc.encoding and doc.html. Plain text streams;
    an HTML page is parsed whole, so one over max_bytes characters is quarantined."""
    with _open(path) as stream:
        head, doc.encoding = _sniff(stream)
        chunks = _decoded(stream, head, doc.encoding)
        first = next(chunks)
        if strip_html and (_kind(path.name) == "html" or looks_like_html(first)):
            doc.html = True
            page, size = [first], len(first)
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large("HTML page of", max_bytes)
                page.append(chunk)
            yield html_to_text("".join(page))  # lxml needs the whole document
        else:
            yield first
            yield from chunks


def pieces(path: Path, target: int, text_field: str) -> list[tuple[int, list]] | None:
    """A raw file over `target` bytes cut into parts of about that size, as (bytes, part) pairs, so that several
    tasks read one large file and give the documents, names and all, of reading it whole (`documents(...,
    part=part)`): an uncompressed UTF-8 .jsonl file in line ranges, a .parquet file in runs of whole row groups.
    None for any other file (a compressed file is one stream, read by one task, as Ray Data and datatrove read
    it too)."""
    if path.is_file() and path.stat().st_size > target and not _compression(path.name):
        if _kind(path.name) == "jsonl" and (ranges := line_ranges(path, target)):
            return [(r[1] - r[0], r) for r in ranges]
        if _kind(path.name) == "parquet":
            return row_group_runs(path, target, text_field)
    return None


def row_group_runs(path: Path, target: int, text_field: str) -> list[tuple[int, list]] | None:
    """A .parquet file's row groups in runs of about `target` bytes on disk: (bytes, [first group, stop group,
    number of the first row]) each. None for a single row group, or a file whose footer or columns reading it
    whole reports as a problem (once, not once per run)."""
    try:
        with pq.ParquetFile(path) as table:
            meta = table.metadata
            if meta.num_row_groups < 2 or text_field not in table.schema_arrow.names:
                return None
            groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError):
        return None
    runs, first, row, size = [], 0, 1, 0
    for g, group in enumerate(groups):
        size += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        if size >= target or g == len(groups) - 1:
            runs.append((size, [first, g + 1, row]))
            row += sum(groups[i].num_rows for i in range(first, g + 1))
            first, size = g + 1, 0
    return runs if len(runs) > 1 else None


def line_ranges(path: Path, target: int) -> list[list] | None:
    """An uncompressed UTF-8 .jsonl file over `target` bytes cut into line-aligned byte ranges of about that size:
    [start, stop, number of the first line, encoding] each, so that several tasks read one large file and give
    the documents, names and all, of reading it whole (`documents(..., part=range)`). None when it cannot be cut."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            _, encoding = _sniff(f)
        except Quarantine:
            return None  # reading it whole reports the problem
        if codecs.lookup(encoding).name not in ("utf-8", "ascii", "utf-8-sig"):
            return None  # a newline byte may not end a line in other encodings
        ranges, start, first = [], 0, 1
        while start < size:
            f.seek(min(start + target, size))
            stop = f.tell()
            while chunk := f.readline(CHUNK_BYTES):  # to the end of the line holding byte `stop`
                stop += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            ranges.append([start, stop, first, encoding])
            f.seek(start)
            left = stop - start
            while left > 0:
                block = f.read(min(CHUNK_BYTES, left))
                left -= len(block)
                first += block.count(b"\n")
            start = stop
    return ranges


def _range(path: Path, start: int, stop: int) -> BinaryIO:
    def blocks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0 and (block := f.read(min(CHUNK_BYTES, left))):
                left -= len(block)
                yield block

    return io.BufferedReader(_Blocks(blocks()), CHUNK_BYTES)


def _jsonl_lines(path: Path, max_chars: int, part: list | None = None) -> Iterator[str | None]:
    """Each line of a .jsonl file (or of one of its `line_ranges`), in linear time however long it is (a line's
    pieces are joined once, not re-concatenated per block); None for a line over max_chars characters, which is
    never held whole."""
    with _open(path) if part is None else _range(path, part[0], part[1]) as stream:
        head, encoding = _sniff(stream) if part is None else (b"", part[3])
        parts: list[str] = []  # the pieces of the line read so far (emptied once it is too long)
        size = 0
        for text in _decoded(stream, head, encoding):
            *complete, tail = text.split("\n")
            for piece in complete:
                size += len(piece)
                yield None if size > max_chars else "".join(parts) + piece
                parts, size = [], 0
            size += len(tail)
            if size > max_chars:
                parts = []  # too long: counted to its end, never held
            else:
                parts.append(tail)
        yield None if size > max_chars else "".join(parts)


def _parquet_values(path: Path, text_field: str, part: list | None = None) -> Iterator[object]:
    """Each value of the `text_field` column (of the row groups `part` runs over), in row order, one record batch
    at a time (the other columns are never read)."""
    try:
        with pq.ParquetFile(path) as table:
            columns = table.schema_arrow.names
            if text_field not in columns:
                raise Quarantine(
                    f"no_text_field: no column '{text_field}' (columns: {', '.join(columns)}); "
                    "set data.sources[].text_field"
                )
            # use_threads=False: the clean stage already runs one process per core
            groups = None if part is None else range(part[0], part[1])
            batches = table.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field], use_threads=False
            )
            for batch in batches:
                yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        if is_out_of_space(exc):
            raise
        raise Quarantine(f"bad_parquet: unreadable or corrupt Parquet ({type(exc).__name__}: {exc})") from None


def _parquet_documents(
    path: Path, name: str, text_field: str, strip_html: bool, max_bytes: int, part: list | None = None
) -> Iterator[tuple[Doc, Iterable[str]]]:
    if _compression(path.name):
        raise Quarantine("bad_parquet: a compressed Parquet file cannot be read; Parquet compresses inside itself")
    for number, value in enumerate(_parquet_values(path, text_field, part), start=part[2] if part else 1):
        doc = Doc(f"{name}#R{number}")
        if not isinstance(value, str):
            what = "null" if value is None else f"a value of type {type(value).__name__}"
            yield doc, _raise(Quarantine(f"no_text_field: row {number} holds {what}, not a string, in '{text_field}'"))
            continue
        doc.raw_bytes = len(value.encode("utf-8"))
        if doc.raw_bytes > max_bytes:
            yield doc, _raise(_too_large(f"row {number} holds", max_bytes))
            continue
        if strip_html and looks_like_html(value):
            doc.html, value = True, html_to_text(value)
        yield doc, [value]


def documents(
    path: Path, name: str, text_field: str, strip_html: bool, max_bytes: int, part: list | None = None
) -> Iterator[tuple[Doc, Iterable[str]]]:
    """(doc, text chunks) for each document of one raw file, or of one of its `pieces` (`part`). Raises
    Quarantine for a whole-file problem; a chunk iterator raises Quarantine for a problem with its document only."""
    if not path.is_file():
        raise Quarantine(f"missing_file: {path} is listed in the manifest but missing")
    kind, compression = _kind(path.name), _compression(path.name)
    if kind == "parquet":
        yield from _parquet_documents(path, name, text_field, strip_html, max_bytes, part)
        return
    if kind != "jsonl":
        if compression:
            _check_whole(path, max_bytes)
        doc = Doc(name, raw_bytes=path.stat().st_size)
        yield doc, _text_doc(path, doc, strip_html, max_bytes)
        return
    for number, line in enumerate(_jsonl_lines(path, max_bytes, part), start=part[2] if part else 1):
        if line is None:
            yield Doc(f"{name}#L{number}", raw_bytes=max_bytes), _raise(_too_large(f"line {number} holds", max_bytes))
            continue
        if not line.strip():
            continue  # blank lines separate nothing and are not documents
        doc = Doc(f"{name}#L{number}", raw_bytes=len(line.encode("utf-8")) + 1)
        try:
            record = json.loads(line)
        except ValueError as exc:
            yield doc, _raise(Quarantine(f"malformed_json: line {number}: {exc}"))
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield doc, _raise(Quarantine(f"no_text_field: line {number} has no string field '{text_field}'"))
            continue
        if strip_html and looks_like_html(text):
            doc.html, text = True, html_to_text(text)
        yield doc, [text]


def _raise(exc: Exception) -> Iterator[str]:
    raise exc
    yield  # a generator, so that the error surfaces when the document is read
