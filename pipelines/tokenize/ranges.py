"""A clean split cut into line-aligned byte ranges that tasks read on their own, and their part files joined back.

A range starts at a line start and ends after a line end, so every record lies in exactly one range, whatever the
chunk size; reading the ranges in order reads the file in order.

    >>> byte_ranges(Path("data/clean/train.jsonl"), 16 * 2**20)
    [(0, 16777309), (16777309, 33554808), ...]
    >>> for line_no, line, text in read_range(Path("data/clean/train.jsonl"), 0, 16777309): ...
    >>> concatenate([scratch / "train.00000.bin", scratch / "train.00001.bin"], tokens / "train.bin")
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

COPY_BLOCK = 16 * 2**20  # bytes per read while joining part files


def byte_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about chunk_bytes (more when a line runs past) covering the file; [] when empty."""
    size = path.stat().st_size
    ranges: list[tuple[int, int]] = []
    start = 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + chunk_bytes, size) - 1)
            f.readline()  # on to the end of the line holding the range's last byte
            ranges.append((start, f.tell()))
            start = f.tell()
    return ranges


def read_range(path: Path, start: int, end: int) -> Iterator[tuple[int, bytes, str | None]]:
    """(line number within the range, raw line, its "text") for each non-blank line of [start, end); the text is
    None for a line that is no clean record (pipelines/common/clean_split.py reads whole splits the same way)."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, line_no = start, 0
        while pos < end and (line := f.readline()):
            pos += len(line)
            line_no += 1
            if not line.strip():
                continue
            try:
                text = json.loads(line.decode("utf-8"))["text"]  # decoded first: json.loads would skip a BOM
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                text = None
            yield line_no, line, text if isinstance(text, str) else None


def lines_before(path: Path, offset: int) -> int:
    """How many lines end before byte `offset` (a range's start): turns a line number within it into the file's."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(COPY_BLOCK, offset))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def concatenate(parts: list[Path], target: Path) -> None:
    """Write the parts one after another to target, removing each once copied (the disk holds the data once)."""
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, COPY_BLOCK)
            part.unlink()
