"""read.documents: zstd files read like their plain versions, Parquet rows become documents, and a broken file or
value is quarantined with its reason."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipelines.clean.read import Quarantine, documents
from tests.helpers.texts import CAFE, MILTON, MODERN, PAGE, SONNET

MAX_BYTES = 1 << 20


def read(path: Path, text_field: str = "text", max_bytes: int = MAX_BYTES) -> dict[str, dict]:
    """Each document of one file by name: its text (or the Quarantine reason) and what the Doc recorded."""
    got = {}
    for doc, chunks in documents(path, path.name, text_field, True, max_bytes):
        try:
            got[doc.file] = {"text": "".join(chunks), "raw_bytes": doc.raw_bytes, "html": doc.html}
        except Quarantine as exc:
            got[doc.file] = {"reason": str(exc), "raw_bytes": doc.raw_bytes}
        got[doc.file]["encoding"] = doc.encoding
    return got


def file_reason(path: Path, text_field: str = "text", max_bytes: int = MAX_BYTES) -> str:
    """The reason a whole file is quarantined."""
    with pytest.raises(Quarantine) as raised:
        read(path, text_field, max_bytes)
    return str(raised.value)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# --- zstd ---------------------------------------------------------------------------------------------------------

JSONL = "".join(json.dumps({"text": t}) + "\n" for t in (MODERN, "", MILTON)) + "\n" + json.dumps({"body": 1}) + "\n"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("play.txt", MODERN.encode()),
        ("cafe.txt", (CAFE * 40).encode("cp1252")),
        ("page.html", PAGE.encode()),
        ("lines.jsonl", JSONL.encode()),
        ("empty.txt", b""),
    ],
)
def test_zstd_files_read_like_their_plain_versions(tmp_path: Path, name: str, data: bytes) -> None:
    plain = tmp_path / "plain" / name
    packed = tmp_path / "zstd" / f"{name}.zst"
    plain.parent.mkdir()
    packed.parent.mkdir()
    plain.write_bytes(data)
    packed.write_bytes(zstd(data))
    got = {k.replace(".zst", ""): {**v, "raw_bytes": None} for k, v in read(packed).items()}
    assert got == {k: {**v, "raw_bytes": None} for k, v in read(plain).items()}
    assert got  # a text file is one document, a JSONL file one per non-blank line


def test_zstd_of_several_frames_and_a_skippable_one_reads_whole(tmp_path: Path) -> None:
    data = (MODERN + SONNET).encode()
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"meta"  # a frame zstd skips (seekable-format indexes use them)
    path = tmp_path / "play.txt.zst"
    path.write_bytes(skippable + zstd(data[:100]) + zstd(data[100:]))
    assert read(path)["play.txt.zst"]["text"] == MODERN + SONNET


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_a_truncated_zstd_file_is_quarantined(tmp_path: Path, cut: int) -> None:
    packed = zstd(MILTON.encode() * 10)
    path = tmp_path / "lines.jsonl.zst"
    path.write_bytes(packed[:cut])
    assert file_reason(path).startswith("bad_zstd: ")


def test_a_file_that_is_not_zstd_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "a.txt.zst"
    path.write_bytes(b"this is not zstd data at all")
    assert file_reason(path).startswith("bad_zstd: corrupt zstd")


def test_a_zstd_bomb_is_quarantined_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bomb.txt.zst"
    path.write_bytes(zstd(b"All work and no play. " * 100_000))  # 2.2 MB unpacked, a few hundred bytes packed
    assert path.stat().st_size < 1000
    assert file_reason(path, max_bytes=1 << 20) == "too_large: unzstds to more than data.max_file_bytes=1048576 bytes"


def test_gzip_is_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL.encode()))
    assert [d["text"] for d in read(path).values() if "text" in d] == [MODERN, "", MILTON]
    path.write_bytes(gzip.compress(JSONL.encode())[:30])
    assert file_reason(path).startswith("bad_gzip: ")


# --- compressed JSONL: streamed, not capped whole ---------------------------------------------------------------

COMPRESS = {"gz": gzip.compress, "zst": zstd}


def read_until_quarantined(path: Path) -> tuple[list[str], str]:
    """The texts of a file's documents read before a Quarantine ends it, and its reason."""
    texts = []
    with pytest.raises(Quarantine) as raised:
        for _doc, chunks in documents(path, path.name, "text", True, MAX_BYTES):
            texts.append("".join(chunks))
    return texts, str(raised.value)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_a_compressed_jsonl_past_max_bytes_is_read_line_by_line(tmp_path: Path, compression: str) -> None:
    """Only a line is held whole: the file decompresses to 20x max_bytes, every line is read, and the one line
    over max_bytes is quarantined alone."""
    texts = [f"document {n}: " + "word " * 40 for n in range(100)]
    texts[50] = "long " * 300
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    assert len(data) > 20 * 1024
    path = tmp_path / f"lines.jsonl.{compression}"
    path.write_bytes(COMPRESS[compression](data))
    got = read(path, max_bytes=1024)
    assert list(got) == [f"{path.name}#L{n}" for n in range(1, 101)]
    assert got[f"{path.name}#L51"]["reason"] == "too_large: line 51 holds more than data.max_file_bytes=1024 bytes"
    assert [d.get("text") for d in got.values()] == texts[:50] + [None] + texts[51:]


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_a_compressed_text_past_max_bytes_is_quarantined_whole(tmp_path: Path, compression: str) -> None:
    """A text file is one document, held whole: decompressing past max_bytes quarantines it before it is read."""
    path = tmp_path / f"play.txt.{compression}"
    path.write_bytes(COMPRESS[compression](MODERN.encode() * 10))
    assert len(MODERN.encode()) * 10 > 1024
    verb = {"gz": "gunzips", "zst": "unzstds"}[compression]
    assert file_reason(path, max_bytes=1024) == f"too_large: {verb} to more than data.max_file_bytes=1024 bytes"


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_a_truncated_compressed_jsonl_keeps_the_lines_before_the_damage(tmp_path: Path, compression: str) -> None:
    """No pass over the whole stream first: the lines before the damage are read, then the stream is quarantined
    (the clean stage records what is left of the file as `<file>#rest`)."""
    texts = [f"document {n}: {MILTON}" for n in range(4000)]  # ~3 MB: the damage lies past the first reads
    packed = COMPRESS[compression]("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    path = tmp_path / f"lines.jsonl.{compression}"
    path.write_bytes(packed[: len(packed) * 3 // 4])
    got, reason = read_until_quarantined(path)
    assert reason.startswith(f"bad_{'gzip' if compression == 'gz' else 'zstd'}: ")
    assert 0 < len(got) < len(texts)
    assert got == texts[: len(got)]


# --- Parquet ------------------------------------------------------------------------------------------------------


def test_parquet_rows_are_documents(tmp_path: Path) -> None:
    texts = [MODERN, "naïve 日本語 🙂", PAGE, MILTON]
    path = write_parquet(tmp_path / "rows.parquet", {"id": [1, 2, 3, 4], "text": texts}, row_group_size=3)
    got = read(path)
    assert list(got) == [f"rows.parquet#R{n}" for n in (1, 2, 3, 4)]  # across row groups, in order
    assert [d["raw_bytes"] for d in got.values()] == [len(t.encode()) for t in texts]
    assert got["rows.parquet#R1"]["text"] == MODERN and got["rows.parquet#R4"]["text"] == MILTON
    assert got["rows.parquet#R2"]["text"] == "naïve 日本語 🙂"
    assert got["rows.parquet#R3"]["html"] and "<" not in got["rows.parquet#R3"]["text"]  # stripped like JSONL's


def test_a_custom_text_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "rows.parquet", {"text": ["not this"], "content": [SONNET]})
    assert read(path, text_field="content") == {
        "rows.parquet#R1": {"text": SONNET, "raw_bytes": len(SONNET.encode()), "html": False, "encoding": None}
    }


def test_a_parquet_file_without_the_column_is_quarantined(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "rows.parquet", {"id": [1], "body": [MODERN]})
    assert file_reason(path) == ("no_text_field: no column 'text' (columns: id, body); set data.sources[].text_field")


def test_a_null_or_non_string_value_quarantines_its_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "rows.parquet", {"text": [MODERN, None, MILTON]})
    got = read(path)
    assert got["rows.parquet#R2"]["reason"] == "no_text_field: row 2 holds null, not a string, in 'text'"
    assert got["rows.parquet#R1"]["text"] == MODERN and got["rows.parquet#R3"]["text"] == MILTON
    path = write_parquet(tmp_path / "numbers.parquet", {"text": [7]})
    assert (
        read(path)["numbers.parquet#R1"]["reason"]
        == "no_text_field: row 1 holds a value of type int, not a string, in 'text'"
    )


def test_a_value_over_max_bytes_is_too_large(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "rows.parquet", {"text": ["word " * 1000, SONNET]})
    got = read(path, max_bytes=len(SONNET.encode()))
    assert got["rows.parquet#R1"] == {
        "reason": f"too_large: row 1 holds more than data.max_file_bytes={len(SONNET.encode())} bytes",
        "raw_bytes": 5000,
        "encoding": None,
    }
    assert got["rows.parquet#R2"]["text"] == SONNET


@pytest.mark.parametrize("damage", ["truncated", "not_parquet", "compressed"])
def test_an_unreadable_parquet_file_is_quarantined(tmp_path: Path, damage: str) -> None:
    good = write_parquet(tmp_path / "good.parquet", {"text": [MODERN, MILTON]}).read_bytes()
    data = {"truncated": good[: len(good) // 2], "not_parquet": b"text, not Parquet", "compressed": zstd(good)}
    path = tmp_path / ("rows.parquet.zst" if damage == "compressed" else "rows.parquet")
    path.write_bytes(data[damage])
    assert file_reason(path).startswith("bad_parquet: ")


def test_a_corrupt_page_quarantines_what_is_left(tmp_path: Path) -> None:
    """The footer is sound, a data page is not: the file is quarantined when reading reaches it."""
    path = write_parquet(tmp_path / "rows.parquet", {"text": [MODERN, MILTON]})
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the first page's header, after the magic bytes
    path.write_bytes(bytes(data))
    assert file_reason(path).startswith("bad_parquet: unreadable or corrupt Parquet (")
