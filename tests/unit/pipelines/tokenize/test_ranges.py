"""pipelines/tokenize/ranges.py: line-aligned byte ranges cover a split once, read back as the whole split reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.common.clean_split import CleanSplitError, iter_texts
from pipelines.tokenize.ranges import byte_ranges, concatenate, lines_before, read_range

TEXTS = ["short", "a longer passage " * 20, "", "日本語 🎉", "x" * 300, "last"]


@pytest.fixture
def split(tmp_path) -> Path:
    """A clean split with a blank line in the middle and no newline after its last record."""
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in TEXTS]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]), encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 500, 10**6])
def test_ranges_cover_the_file_once_at_line_ends(split, chunk_bytes):
    data = split.read_bytes()
    ranges = byte_ranges(split, chunk_bytes)
    assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == len(data)
    assert all(data[end - 1 : end] == b"\n" for _, end in ranges[:-1])
    assert all(end - start >= min(chunk_bytes, len(data) - start) for start, end in ranges)
    texts = [text for start, end in ranges for _, _, text in read_range(split, start, end)]
    assert texts == list(iter_texts(split)) == TEXTS


def test_an_empty_split_has_no_ranges(tmp_path):
    (tmp_path / "val.jsonl").write_bytes(b"")
    assert byte_ranges(tmp_path / "val.jsonl", 16) == []


@pytest.mark.parametrize("bad", ["{not json", '{"id": 1}', '{"text": 3}', "[1]", '\ufeff{"text": "bom"}'])
def test_a_bad_record_is_found_at_the_line_the_whole_split_reader_names(tmp_path, bad):
    path = tmp_path / "test.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n' + bad + '\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(CleanSplitError, match=r"test\.jsonl:4 is not a clean record"):
        list(iter_texts(path))
    start, end = next((s, e) for s, e in byte_ranges(path, 20) if any(t is None for _, _, t in read_range(path, s, e)))
    line_no = next(n for n, _, text in read_range(path, start, end) if text is None)
    assert lines_before(path, start) + line_no == 4


def test_concatenate_joins_parts_in_order_and_removes_them(tmp_path):
    parts = []
    for i, data in enumerate([b"ab", b"", b"cde"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    concatenate(parts, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"abcde" and not any(p.exists() for p in parts)
