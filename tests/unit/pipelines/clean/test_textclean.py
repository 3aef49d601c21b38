"""Per-document text cleaning (pipelines/clean/textclean.py): decoding, normalisation, Project Gutenberg's
boilerplate, HTML."""

from __future__ import annotations

import codecs
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.clean.textclean import (
    TextCleaner,
    binary_reason,
    clean_text,
    decode_bytes,
    detect_encoding,
    html_to_text,
    looks_like_html,
    strip_gutenberg,
)
from tests.helpers.texts import BODY, CAFE, GUTENBERG_MODERN, GUTENBERG_OLD, MODERN, PAGE

# --- decoding -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(codecs.BOM_UTF8 + "héllo wörld\n".encode(), "héllo wörld\n", id="utf8-bom"),
        pytest.param("héllo 世界 🌍\n".encode("utf-16"), "héllo 世界 🌍\n", id="utf16-bom-native"),
        pytest.param(codecs.BOM_UTF16_BE + "héllo 世界\n".encode("utf-16-be"), "héllo 世界\n", id="utf16-be-bom"),
        pytest.param(codecs.BOM_UTF16_LE + "héllo 世界\n".encode("utf-16-le"), "héllo 世界\n", id="utf16-le-bom"),
        pytest.param(
            ("Plain English text, no BOM. " * 4).encode("utf-16-le"),
            "Plain English text, no BOM. " * 4,
            id="utf16-le-no-bom",
        ),
        pytest.param("utf-32 too ✓\n".encode("utf-32"), "utf-32 too ✓\n", id="utf32-bom"),
        pytest.param(CAFE.encode("cp1252"), CAFE, id="cp1252"),
        pytest.param("café — naïve".encode("cp1252"), "café — naïve", id="cp1252-short"),
        pytest.param(
            ("Привет, мир! Это проверка кодировки windows-1251.\n" * 2).encode("cp1251"),
            "Привет, мир! Это проверка кодировки windows-1251.\n" * 2,
            id="cp1251",
        ),
        pytest.param(b"plain ascii\n", "plain ascii\n", id="ascii"),
        pytest.param(
            "日本語のテキスト、Ελληνικά, العربية, עברית 👩‍👩‍👧\n".encode(),
            "日本語のテキスト、Ελληνικά, العربية, עברית 👩‍👩‍👧\n",
            id="utf8-scripts",
        ),
    ],
)
def test_decode_bytes(data: bytes, expected: str) -> None:
    assert decode_bytes(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"caf\xc3\xa9 ok \xff\xfe broken \xc3",
        b"plain ascii with one bad byte \x81 in it",
        b"\xc3\x28\xa0\xa1\xe2\x28\xa1",
        b"\xed\xa0\x80 a lone surrogate in UTF-8",
        b"\xf0\x9f\x98",
        b"",
    ],
)
def test_decode_never_crashes_on_invalid_bytes(data: bytes) -> None:
    text = decode_bytes(data)
    assert isinstance(text, str)
    assert isinstance(clean_text(text).encode("utf-8"), bytes)  # the cleaned text can always be written


def test_mostly_utf8_with_a_stray_byte_stays_utf8() -> None:
    data = "naïve café — ".encode() * 10 + b"\xff" + "déjà vu".encode()
    assert detect_encoding(data) == "utf-8"
    assert decode_bytes(data).endswith("\ufffddéjà vu")


@pytest.mark.parametrize(
    ("head", "binary"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), True),
        (b"\x7fELF\x02\x01\x01" + bytes(64), True),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", True),
        (bytes(range(256)) * 8, True),
        (b"text " * 200 + b"\x00\x00" + b" more text " * 100, False),  # a couple of NULs: cleaned, not binary
        ("UTF-16 text".encode("utf-16"), False),
        ("UTF-16 text without a BOM, long enough".encode("utf-16-le"), False),
        (b"", False),
        ("ordinary text, naïve".encode("cp1252"), False),
    ],
)
def test_binary_reason(head: bytes, binary: bool) -> None:
    reason = binary_reason(head)
    assert (reason is not None) == binary
    if binary:
        assert reason.startswith("binary: ")


# --- cleaning -----------------------------------------------------------------------------------------------------

KEPT_AS_IS = [
    "中文文本，没有变化。日本語のテキスト。한국어 텍스트.",
    "Кириллица: Съешь же ещё этих мягких французских булок.",
    "العربية: نص باللغة العربية من اليمين إلى اليسار",
    "emoji 🎭 👩‍🔬 🏳️‍🌈 🇬🇧 and a ZWJ family 👨‍👩‍👧‍👦",
    "Ελληνικά, עברית, हिन्दी, ไทย",
    "\tTabbed and    spaced   inside, kept",
    "  To be, or not to be: that is the question:\n    Whether 'tis nobler in the mind to suffer",
]


@pytest.mark.parametrize("text", KEPT_AS_IS)
def test_clean_keeps_any_script_as_is(text: str) -> None:
    assert clean_text(text) == unicodedata.normalize("NFC", text) == text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\r\nb\rc\nd", "a\nb\nc\nd"),
        ("nul\x00s\x00 and\x07 bells\x1b", "nuls and bells"),
        ("C1\x85next line\x9bdone", "C1\nnext linedone"),
        ("form\x0cfeed and\x0bvtab", "form\nfeed and\nvtab"),
        ("e\u0301 and A\u030a", "é and Å"),  # NFC
        ("trailing   \nspaces\t\n", "trailing\nspaces"),
        ("one\n\n\n\n\ntwo\n \n\t\n\nthree", "one\n\ntwo\n\nthree"),
        ("\n\n\n   \nstarts late\n\n\n", "starts late"),
        ("lone surrogate \ud800 from JSON", "lone surrogate \ufffd from JSON"),
        ("", ""),
        (" \n\t\n\r\n", ""),
    ],
)
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


_ALPHABET = st.sampled_from(
    list("ab yz\n\n\r\t\x00\x07\x85é\u0301世🎭 .*<>")
    + [
        "\r\n",
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n",
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n",
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS\nOF SHAKESPEARE>>\n",
        "    ",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(_ALPHABET, max_size=80),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    gutenberg=st.booleans(),
    pending=st.sampled_from([4, 16, 1 << 18]),
)
def test_streaming_equals_one_shot(pieces: list[str], cuts: list[int], gutenberg: bool, pending: int) -> None:
    text = "".join(pieces)
    cleaner = TextCleaner(gutenberg, max_pending=pending)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    streamed = "".join(cleaner.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + cleaner.finish()
    assert streamed == clean_text(text, gutenberg)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_clean_output_properties(text: str) -> None:
    out = clean_text(text, strip_gutenberg=False)
    assert "\r" not in out and "\n\n\n" not in out
    assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in out)
    assert unicodedata.is_normalized("NFC", out)
    assert all(line == line.rstrip() for line in out.split("\n"))
    assert out == out.strip("\n")
    assert clean_text(out, strip_gutenberg=False) == out  # idempotent
    out.encode("utf-8")


def test_strip_gutenberg_modern_header_footer_and_licence() -> None:
    out = strip_gutenberg(GUTENBERG_MODERN)
    assert out == clean_text(BODY)
    assert out.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\nBer. Who's there?")
    assert "Gutenberg" not in out and "LICENSE" not in out and "Produced by" not in out


def test_strip_gutenberg_old_small_print_and_world_library_notices() -> None:
    out = strip_gutenberg(GUTENBERG_OLD)
    assert out == clean_text(BODY)
    assert "SMALL PRINT" not in out and "WORLD LIBRARY" not in out and "Etext" not in out


def test_gutenberg_stripping_can_be_turned_off_and_leaves_plain_text_alone() -> None:
    assert "Project Gutenberg" in clean_text(GUTENBERG_MODERN, strip_gutenberg=False)
    assert strip_gutenberg(MODERN) == clean_text(MODERN, strip_gutenberg=False)


# --- HTML ---------------------------------------------------------------------------------------------------------


def test_html_to_text() -> None:
    assert html_to_text(PAGE) == (
        "Sonnet 18\n\n"
        "Shall I compare thee to a summer’s day?\nThou art more lovely and more temperate:\n\n"
        "Rough winds do shake the darling buds of May,\nAnd summer’s lease hath all too short a date;\n\n"
        "one\ntwo & three\n\n"
        "  keep   this\n    spacing"
    )


@pytest.mark.parametrize(
    ("text", "html"),
    [
        (PAGE, True),
        ("<p>a</p><p>b</p><p>c</p><br><div>d</div>", True),
        (MODERN, False),
        ("if a < b and c > d: print('<p>')", False),
        ("", False),
    ],
)
def test_looks_like_html(text: str, html: bool) -> None:
    assert looks_like_html(text) is html


def test_html_to_text_survives_garbage() -> None:
    assert html_to_text("") == ""
    assert html_to_text("<<<>>>") == "<<<>>>"
    assert html_to_text("<p>unclosed <b>tags") == "unclosed tags"
