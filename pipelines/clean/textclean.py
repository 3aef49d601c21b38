"""Pure text functions of the clean stage: sniff bytes, decode, normalise, strip boilerplate.

Nothing here touches the filesystem. The pieces, in the order the stage applies them:

    binary_reason(head)        -> why these bytes are not text, or None
    detect_encoding(head)      -> a Python codec name ("utf-8", "utf-16", "cp1252", ...) or None
    html_to_text(html)         -> the visible text, one blank line between blocks
    TextCleaner().feed(chunk)  -> NFC, no control characters, \\n newlines, no trailing spaces,
                                  at most one blank line in a row, Gutenberg header/footer removed

`TextCleaner` streams: feed it chunks of any size and it holds back at most one partial line
(or `max_pending` characters of a line that never ends), so a 100 MB file with no newline is
cleaned in bounded memory. `clean_text` is the one-shot form:

    >>> clean_text("Who's there?\\r\\n\\r\\n\\r\\n  Nay, answer me. \\x00\\n")
    "Who's there?\\n\\n  Nay, answer me."
"""

from __future__ import annotations

import codecs
import re
import unicodedata

import charset_normalizer
import lxml.html
from lxml.etree import ParserError

HEAD_BYTES = 1 << 16  # bytes sniffed for binary content and encoding

# --- bytes: binary or text, and which encoding -------------------------------------------------

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"%PDF-", "PDF document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"BZh91AY&SY", "bzip2 data"),
    (b"\xfd7zXZ\x00", "xz data"),
    (b"\x28\xb5\x2f\xfd", "zstd data"),
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"\x7fELF", "ELF executable"),
    (b"\xca\xfe\xba\xbe", "Mach-O/Java class"),
    (b"\xcf\xfa\xed\xfe", "Mach-O executable"),
    (b"SQLite format 3\x00", "SQLite database"),
    (b"\x00asm", "WebAssembly module"),
    (b"OggS", "Ogg media"),
    (b"\x1aE\xdf\xa3", "Matroska/WebM media"),
    (b"PAR1", "Parquet file"),
]
_BOMS = [  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
]
_CONTROL_BYTES = bytes([*range(0, 9), 11, *range(14, 27), *range(28, 32), 127])  # not \t \n \f \r ESC
_MAX_CONTROL_FRACTION = 0.05  # more control bytes than this in the head: binary
_PREFERRED_LEGACY = "cp1252"  # ties between legacy single-byte encodings go to the commonest one
_CHAOS_SLACK = 0.15  # charset-normalizer candidates this close to the least chaotic one are ties


def _bom_encoding(head: bytes) -> str | None:
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), None)


def _utf16_without_bom(head: bytes) -> str | None:
    """UTF-16 of mostly-Latin text puts a NUL in every other byte; which half says the byte order."""
    n = len(head) // 2 * 2
    if n < 8:
        return None
    even, odd = head[0:n:2], head[1:n:2]
    zeros_even, zeros_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    if zeros_odd > 0.3 and zeros_even < 0.05 and _control_fraction(even) <= _MAX_CONTROL_FRACTION:
        return "utf-16-le"
    if zeros_even > 0.3 and zeros_odd < 0.05 and _control_fraction(odd) <= _MAX_CONTROL_FRACTION:
        return "utf-16-be"
    return None


def _control_fraction(data: bytes) -> float:
    return (len(data) - len(data.translate(None, _CONTROL_BYTES))) / len(data) if data else 0.0


def binary_reason(head: bytes) -> str | None:
    """Why `head` (a file's first bytes) is not text, or None if it may be.

    >>> binary_reason(b"\\x89PNG\\r\\n\\x1a\\n...")
    'binary: PNG image (magic bytes)'
    """
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"binary: {what} (magic bytes)"
    if not head or _bom_encoding(head) or _utf16_without_bom(head):
        return None
    control = _control_fraction(head)
    if control > _MAX_CONTROL_FRACTION:
        return f"binary: {control:.0%} control bytes ({head.count(0)} NUL) in the first {len(head)} bytes"
    return None


def _is_utf8(head: bytes) -> bool:
    """True if `head` is UTF-8, or UTF-8 with a few stray invalid bytes among real multi-byte characters."""
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            return True  # the head cut a multi-byte character in half
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    multibyte = sum(1 for ch in text if ord(ch) > 127) - bad
    return multibyte > 0 and bad <= multibyte  # mostly valid UTF-8; the stray bytes become U+FFFD


def detect_encoding(head: bytes) -> str | None:
    """A codec name for `head`: BOM, then UTF-16 without BOM, then UTF-8, then charset-normalizer.

    None means no encoding gives readable text (the caller quarantines the file).

    >>> detect_encoding("café — naïve, façade".encode("cp1252"))
    'cp1252'
    """
    encoding = _bom_encoding(head) or _utf16_without_bom(head)
    if encoding:
        return encoding
    if _is_utf8(head):
        return "utf-8"
    matches = list(charset_normalizer.from_bytes(head))
    if not matches:
        return None
    least_chaos = min(m.chaos for m in matches)
    close = [m for m in matches if m.chaos <= least_chaos + _CHAOS_SLACK]
    # Old Mac code pages are rare today but often tie with the Windows ones: rank them last.
    best = max(
        close,
        key=lambda m: (
            not m.encoding.startswith("mac_"),
            round(m.coherence, 2),
            _PREFERRED_LEGACY in m.could_be_from_charset,
        ),
    )
    return _PREFERRED_LEGACY if _PREFERRED_LEGACY in best.could_be_from_charset else best.encoding


def decode_bytes(data: bytes) -> str:
    """Decode a whole (small) byte string the way the stage does; invalid bytes become U+FFFD."""
    return data.decode(detect_encoding(data[:HEAD_BYTES]) or "utf-8", errors="replace")


# --- HTML ---------------------------------------------------------------------------------------

_HTML_SIGNS = re.compile(r"<!doctype\s+html|<html[\s>]|<body[\s>]|<head[\s>]", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?(?:p|div|br|span|a|h[1-6]|li|ul|ol|table|tr|td|em|strong|b|i|pre)\b[^<>]*>", re.I)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
_BLOCK_TAGS = {
    "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre",
    "section", "article", "header", "footer", "nav", "aside", "main", "figure", "hr", "address", "body",
}  # fmt: skip
_LINE_TAGS = {"li", "tr", "dt", "dd", "caption", "figcaption"}
_WS_RUN = re.compile(r"\s+")


def looks_like_html(text: str) -> bool:
    """True if the start of `text` is an HTML document or carries several HTML tags."""
    head = text[:8192]
    return bool(_HTML_SIGNS.search(head)) or len(_HTML_TAG.findall(head)) >= 5


def html_to_text(html: str) -> str:
    """The visible text of an HTML document, a blank line between blocks, whitespace collapsed as a browser
    would (except inside <pre>); scripts, styles and <head> are dropped.

    >>> html_to_text("<p>Who's   there?</p><p>Nay, <b>answer</b> me.<br>Stand.</p>")
    "Who's there?\\n\\nNay, answer me.\\nStand."
    """
    html = _XML_DECL.sub("", html, count=1)  # lxml refuses str input with an encoding declaration
    try:
        root = lxml.html.document_fromstring(html)
    except (ParserError, ValueError):
        return ""
    for el in root.xpath("//script|//style|//noscript|//template|//head"):
        el.drop_tree()
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue  # comments and processing instructions: their text is not content
        in_pre = el.tag == "pre" or any(a.tag == "pre" for a in el.iterancestors())
        if not in_pre:
            el.text = _WS_RUN.sub(" ", el.text) if el.text else el.text
        parent_in_pre = any(a.tag == "pre" for a in el.iterancestors())
        if el.tail and not parent_in_pre:
            el.tail = _WS_RUN.sub(" ", el.tail)
        if el.tag in _BLOCK_TAGS:
            el.text = "\n\n" + (el.text or "")
            el.tail = "\n\n" + (el.tail or "")
        elif el.tag in _LINE_TAGS:
            el.text = "\n" + (el.text or "")
        elif el.tag == "br":
            el.tail = "\n" + (el.tail or "")
    text = root.text_content()
    text = re.sub(r"(?m)^ (?=\S)", "", text)  # the space a collapsed newline left at a line's start
    return _BLANK_RUNS.sub("\n\n", _TRAILING_WS.sub("", text)).strip("\n")


# --- text: normalise, strip Gutenberg boilerplate -----------------------------------------------

_NEWLINES = re.compile("\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")  # C0/C1 controls but \t \n (and those above)
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (from JSON escapes) cannot be written as UTF-8
_TRAILING_WS = re.compile(r"[^\S\n]+(?=\n)")
_BLANK_RUNS = re.compile(r"\n{3,}")
_ANY_ODD = re.compile(f"{_NEWLINES.pattern}|{_CONTROL.pattern}|{_SURROGATE.pattern}")


def normalize_chars(text: str) -> str:
    """Newlines to \\n, control characters and NULs removed (\\t kept), NFC, no trailing spaces before \\n."""
    if _ANY_ODD.search(text):  # most text has none of these: one scan instead of three
        text = _NEWLINES.sub("\n", text)
        text = _CONTROL.sub("", text)
        text = _SURROGATE.sub("\ufffd", text)
    if not text.isascii():  # ASCII is NFC already
        text = unicodedata.normalize("NFC", text)
    return _TRAILING_WS.sub("", text)


# Where a Gutenberg header ends (the text starts after this line) ...
_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG.*"
    r"|\*[ \t]*END[ \t]*\*[ \t]*THE SMALL PRINT!.*)$\n?",
    re.IGNORECASE | re.MULTILINE,
)
# ... and where the footer begins (the text ends before this line).
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|END OF (?:THE |THIS )?PROJECT GUTENBERG"
    r"|END OF (?:THE |THIS )?E-?TEXT OF"
    r"|\*{3}[ \t]*START:? FULL LICEN[CS]E)",
    re.IGNORECASE | re.MULTILINE,
)
# Credits paragraph right after the start marker ("Produced by ...").
_GUTENBERG_CREDITS = re.compile(
    r"\A\s*(?:Produced by|This [e-]*text was prepared by|E-?text prepared by|Transcribed by)[^\n]*(?:\n[^\n]+)*",
    re.IGNORECASE,
)
# The World Library notice that 1990s Gutenberg Shakespeare etexts repeat before every act.
_WORLD_LIBRARY = re.compile(r"^<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>[ \t]*$\n?", re.M | re.S)
_GUTENBERG_HEAD_CHARS = 64_000  # a start marker further in than this is not a header


class _GutenbergFilter:
    """Line-complete pieces in, the same text without Gutenberg header, footer and notices out."""

    def __init__(self) -> None:
        self._head: list[str] | None = []  # pieces buffered while looking for the start marker
        self._head_chars = 0
        self._in_footer = False
        self._held = ""  # the start of a notice whose end has not arrived yet
        self.stripped = False  # a header, footer or notice was removed

    def feed(self, text: str, final: bool = False) -> str:
        if self._in_footer:
            return ""
        if self._head is not None:
            self._head.append(text)
            self._head_chars += len(text)
            if self._head_chars < _GUTENBERG_HEAD_CHARS and not final:
                return ""
            text = "".join(self._head)
            self._head = None
            match = _GUTENBERG_START.search(text, 0, _GUTENBERG_HEAD_CHARS)
            if match:
                self.stripped = True
                text = _GUTENBERG_CREDITS.sub("", text[match.end() :], count=1)
        text, self._held = self._held + text, ""
        if "<<" in text:
            text, notices = _WORLD_LIBRARY.subn("", text)
            self.stripped |= notices > 0
            start = text.rfind("<<THIS ELECTRONIC VERSION")
            if start >= 0 and not final and ">>" not in text[start:] and len(text) - start < 4096:
                text, self._held = text[:start], text[start:]  # a notice cut in half: finish it next time
        end = _GUTENBERG_END.search(text)
        if end:
            self.stripped = self._in_footer = True
            text = text[: end.start()]
        return text


class TextCleaner:
    """Streaming cleaner. `feed` chunks of any size, then `finish`; the concatenated outputs equal
    `clean_text` of the concatenated inputs (a property the tests check over random chunkings).

    Output: NFC, no control characters, \\n newlines, no trailing whitespace on any line, at most one
    blank line in a row, none at the start or end; lines are otherwise kept as they are (verse is never
    reflowed). With `strip_gutenberg`, Project Gutenberg headers, footers and licence text are removed.
    """

    def __init__(self, strip_gutenberg: bool = True, max_pending: int = 1 << 18) -> None:
        self._pending = ""  # raw text after the last safe cut
        self._max_pending = max_pending
        self._gutenberg = _GutenbergFilter() if strip_gutenberg else None
        self._held = ""  # trailing whitespace not yet written: written only before more text
        self._started = False

    @property
    def gutenberg_stripped(self) -> bool:
        return bool(self._gutenberg and self._gutenberg.stripped)

    def feed(self, chunk: str) -> str:
        buf = self._pending + chunk
        hold_cr = buf.endswith("\r")  # may be the first half of \r\n
        if hold_cr:
            buf = buf[:-1]
        cut = max(buf.rfind("\n"), buf.rfind("\r")) + 1
        if cut == 0 and len(buf) > self._max_pending:
            cut = _safe_cut(buf)
        self._pending = buf[cut:] + ("\r" if hold_cr else "")
        return self._emit(buf[:cut], final=False)

    def finish(self) -> str:
        rest, self._pending = self._pending, ""
        return self._emit(rest, final=True)

    def _emit(self, raw: str, final: bool) -> str:
        text = normalize_chars(raw)
        if self._gutenberg is not None:
            text = self._gutenberg.feed(text, final)
        rest = text.lstrip()
        junction = self._held + text[: len(text) - len(rest)]  # whitespace between the last output and `rest`
        if not rest:
            self._held = "" if final else junction
            return ""
        *blank_lines, indent = junction.split("\n")
        prefix = ("\n" * min(len(blank_lines), 2) if self._started else "") + indent
        body = rest.rstrip()
        self._held = "" if final else rest[len(body) :]  # written only if more text follows
        self._started = True
        return prefix + _BLANK_RUNS.sub("\n\n", body)


def _safe_cut(buf: str) -> int:
    """Where to cut a line that never ends: before its last run of spaces (or, failing that, before an
    ASCII character), so that NFC, trailing-space removal and word boundaries are the same either side."""
    space = max(buf.rfind(" "), buf.rfind("\t"))
    if space > 0:
        while space > 0 and buf[space - 1] in " \t":
            space -= 1
        if space > 0:
            return space
    for i in range(len(buf) - 1, max(len(buf) - 4096, 0), -1):
        if buf[i] < "\x80":  # ASCII never combines with what precedes it
            return i
    return len(buf)


def clean_text(text: str, strip_gutenberg: bool = True) -> str:
    """One-shot `TextCleaner`."""
    cleaner = TextCleaner(strip_gutenberg)
    return cleaner.feed(text) + cleaner.finish()


def strip_gutenberg(text: str) -> str:
    """`text` without its Project Gutenberg header, footer and licence (and otherwise cleaned)."""
    return clean_text(text, strip_gutenberg=True)


_INI_LINE = re.compile(r"^(?:\[[^\]\n]+\]|[\w.-]+[ \t]*=.*|[ \t]+\S.*)$")


def looks_like_metadata(text: str) -> bool:
    """True for INI-style metadata files ([section] headers and key = value lines), which are not prose."""
    lines = [line for line in text[:65536].split("\n") if line.strip()]
    sections = sum(1 for line in lines if line.startswith("["))
    return len(lines) >= 3 and sections >= 1 and sum(bool(_INI_LINE.match(x)) for x in lines) >= 0.9 * len(lines)
