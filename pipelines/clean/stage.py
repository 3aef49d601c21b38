"""Stage `clean`: raw corpus files -> cleaned, deduplicated passages split into train/val/test.

In:   data/raw/manifest.json and the raw files it lists (from the ingest stage); params `data.*`
      (min_chars, strip_gutenberg, strip_html, dedup.*, split.*).
Out:  data/clean/{train,val,test}.jsonl  one passage per line: {"id", "text", "source"}
      metrics/clean.json                 docs_in/out, bytes, duplicates, drops, quarantines, per-split sizes
      reports/clean/report.md            every dropped, quarantined and duplicate document, and why
      reports/clean/files.json           the same per document: {file, outcome, reason, duplicate_of}
Run:  python -m pipelines.clean          (or `dvc repro clean`)

A document is a text file (.txt, .md, .html, ...; optionally gzipped) or one line of a .jsonl file.
Each one is decoded (BOMs, UTF-16, UTF-8, legacy encodings via charset-normalizer), cleaned
(pipelines.clean.textclean), checked for length, then deduplicated: exact duplicates by the SHA-256 of the
cleaned text, near duplicates by MinHash LSH over word shingles (pipelines.clean.dedup); in both cases the
first document in sorted path order is kept. Kept documents are cut at paragraph boundaries into
passages of about `split.passage_chars` characters, and each passage goes to a split by a hash of
its text, so adding a document never moves another one's passages.

Documents stream through in bounded memory: cleaned text is spilled to a scratch file and read back
for shingling and cutting, so a 100 MB file without a newline never sits in memory several times.
What must be held whole is bounded by `data.max_file_bytes`: a gunzipped file, an HTML page or a JSONL
line over it is quarantined (`too_large`). A full disk (ENOSPC, EFBIG) stops the stage, never a document.
Every output is written to a temporary path and renamed into place.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

from pipelines.clean import dedup
from pipelines.clean.read import CHUNK_BYTES, Doc, Quarantine, documents
from pipelines.clean.textclean import (
    TextCleaner,
    looks_like_metadata,
)
from pipelines.common.atomic import atomic_dir, is_out_of_space, out_of_space_stops_stage, scratch_dir, write_json
from pipelines.common.layout import Layout
from pipelines.common.params import DataParams, Params
from pipelines.common.progress import track
from pipelines.common.runner import StageError, run_stage
from pipelines.common.splits import SPLITS, split_of

SCRATCH = ".clean-scratch-"  # the spill file's folder beside data/clean; one left by a killed run is removed


class CleanError(StageError):
    """The stage cannot produce a usable corpus; the message says why."""


# --- passages and splits --------------------------------------------------------------------------


def _best_cut(text: str, start: int, target: int) -> tuple[int, int] | None:
    """Where to end a passage that starts at `start` (end, next start): the last paragraph break before
    `target` characters, else the first one before 2*target, else a line break, else a space."""
    lo, hi = start + target // 4, start + 2 * target
    for sep in ("\n\n", "\n", " "):
        cut = text.rfind(sep, lo, start + target + 1)
        if cut < 0:
            cut = text.find(sep, start + target, hi)
        if cut >= 0 and cut + len(sep) < len(text):
            return cut, cut + len(sep)
    return None


def cut_passages(chunks: Iterable[str], target: int) -> Iterator[str]:
    """Cut a document, given as text chunks, into passages of about `target` characters at paragraph
    boundaries (line breaks or spaces when a paragraph is longer than 2*target); 0 keeps it whole.

    >>> list(cut_passages(["aaaa\\n\\nbbbb\\n\\ncccc"], target=8))
    ['aaaa', 'bbbb', 'cccc']
    """
    if target <= 0:
        text = "".join(chunks)
        if text:
            yield text
        return
    buf, start = "", 0
    for chunk in itertools.chain(chunks, [None]):
        final = chunk is None
        if not final:
            buf, start = buf[start:] + chunk, 0  # compact only when new text arrives
        while len(buf) - start > (target if final else 2 * target):
            cut = _best_cut(buf, start, target)
            if cut is None:
                if not final and len(buf) - start < 4 * target:
                    break  # wait for more text before cutting blind
                hard = min(start + 2 * target, len(buf))
                cut = (hard, hard)
            passage = buf[start : cut[0]].strip("\n")
            if passage.strip():
                yield passage
            start = cut[1]
    passage = buf[start:].strip("\n")
    if passage.strip():
        yield passage


def _read_spill(spill: BinaryIO, doc: Doc) -> Iterator[str]:
    """A document's cleaned text back from the spill file, in chunks that end between characters."""
    spill.seek(doc.offset)
    decoder = codecs.getincrementaldecoder("utf-8")()
    left = doc.nbytes
    while left > 0:
        block = spill.read(min(CHUNK_BYTES, left))
        left -= len(block)
        yield decoder.decode(block, final=left <= 0)


# --- the stage --------------------------------------------------------------------------------------


def _load_manifest(raw_dir: Path) -> dict:
    path = raw_dir / "manifest.json"
    if not path.is_file():
        raise CleanError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["files"], manifest.get("skipped", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise CleanError(f"{path} is not a valid manifest ({exc}): run the ingest stage again") from None
    return manifest


def _clean_doc(doc: Doc, chunks: Iterable[str], params: DataParams, spill: BinaryIO) -> None:
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


def _quarantine(doc: Doc, reason: str) -> Doc:
    doc.outcome, doc.drop_key, doc.reason = "quarantined", reason.partition(": ")[0], reason
    return doc


def readdocuments(raw_dir: Path, params: DataParams, spill: BinaryIO) -> list[Doc]:
    """Every document of every manifest entry (sorted by path) cleaned into `spill`, plus one quarantined
    Doc per entry the ingest stage skipped."""
    manifest = _load_manifest(raw_dir)
    docs: list[Doc] = []
    entries = sorted(manifest["files"], key=lambda e: e["file"])
    for entry in track(entries, "clean: read", "file"):
        name = entry["file"]
        first = len(docs)
        try:
            for doc, chunks in documents(
                raw_dir / name, name, entry.get("text_field", "text"), params.strip_html, params.max_file_bytes
            ):
                docs.append(doc)
                start = spill.tell()
                try:
                    _clean_doc(doc, chunks, params, spill)
                except Quarantine as exc:
                    _quarantine(doc, str(exc))
                    spill.seek(start)
                    spill.truncate()
                except (OSError, EOFError, zlib.error, UnicodeError) as exc:
                    if is_out_of_space(exc):
                        raise  # writing the spill file failed: the stage stops, the document is not to blame
                    _quarantine(doc, f"read_error: {type(exc).__name__}: {exc}")
                    spill.seek(start)
                    spill.truncate()
        except Quarantine as exc:
            docs.append(_quarantine(Doc(name if len(docs) == first else f"{name}#rest"), str(exc)))
        except (OSError, EOFError, zlib.error, UnicodeError) as exc:
            if is_out_of_space(exc):
                raise
            docs.append(
                _quarantine(
                    Doc(name if len(docs) == first else f"{name}#rest"), f"read_error: {type(exc).__name__}: {exc}"
                )
            )
    for entry in sorted(manifest.get("skipped", []), key=lambda e: e["file"]):
        docs.append(_quarantine(Doc(entry["file"]), f"skipped_by_ingest: {entry.get('reason', 'no reason given')}"))
    return docs


def deduplicate(docs: list[Doc], params: DataParams, spill: BinaryIO) -> None:
    """Mark exact duplicates (same cleaned text) and near duplicates (pipelines.clean.dedup) among kept docs."""
    first_with: dict[str, Doc] = {}
    for doc in docs:
        if doc.outcome != "kept":
            continue
        if doc.sha256 in first_with:
            doc.outcome, doc.duplicate_of = "duplicate", first_with[doc.sha256].file
            doc.reason = "exact duplicate (same text after cleaning)"
        else:
            first_with[doc.sha256] = doc
    unique = list(first_with.values())
    d = params.dedup
    sketches = [
        dedup.sketch(_read_spill(spill, doc), d.shingle_words, d.num_perm)
        for doc in track(unique, "clean: minhash", "doc")
    ]
    for i, (kept, similarity) in dedup.near_duplicates(sketches, d.jaccard_threshold, d.num_perm).items():
        doc = unique[i]
        doc.outcome, doc.duplicate_of = "near_duplicate", unique[kept].file
        doc.reason = (
            f"near duplicate: Jaccard {similarity:.3f} of word {d.shingle_words}-shingles >= {d.jaccard_threshold}"
        )


def write_splits(docs: list[Doc], params: DataParams, spill: BinaryIO, out: Path) -> dict:
    """Cut kept documents into passages and write {train,val,test}.jsonl under `out`; returns sizes."""
    sizes = {name: {"docs": 0, "bytes": 0} for name in SPLITS}
    seen: set[bytes] = set()
    repeated = 0
    files = {name: open(out / f"{name}.jsonl", "w", encoding="utf-8") for name in SPLITS}
    try:
        kept = [doc for doc in docs if doc.outcome == "kept"]
        for doc in track(kept, "clean: write", "doc"):
            for passage in cut_passages(_read_spill(spill, doc), params.split.passage_chars):
                data = passage.encode("utf-8")
                digest = hashlib.sha256(data).digest()
                if digest in seen:
                    repeated += 1  # the same passage twice (say, a stock closing line) is written once
                    continue
                seen.add(digest)
                split = split_of(digest, params.split.val, params.split.test)
                record = {"id": digest[:8].hex(), "text": passage, "source": doc.file}
                files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                sizes[split]["docs"] += 1
                sizes[split]["bytes"] += len(data)
    finally:
        for f in files.values():
            f.close()
    return {"splits": sizes, "repeated_passages": repeated}


def _metrics(docs: list[Doc], raw_bytes: int, written: dict, seconds: float) -> dict:
    outcomes = Counter(doc.outcome for doc in docs)
    splits = written["splits"]
    return {
        "docs_in": len(docs),
        "docs_out": outcomes["kept"],
        "bytes_in": raw_bytes,
        "bytes_out": sum(s["bytes"] for s in splits.values()),
        "exact_duplicates": outcomes["duplicate"],
        "near_duplicates": outcomes["near_duplicate"],
        "quarantined": outcomes["quarantined"],
        "quarantine_reasons": dict(sorted(Counter(d.drop_key for d in docs if d.outcome == "quarantined").items())),
        "dropped": dict(sorted(Counter(d.drop_key for d in docs if d.outcome == "dropped").items())),
        "gutenberg_stripped": sum(d.gutenberg for d in docs),
        "html_stripped": sum(d.html for d in docs),
        "passages": sum(s["docs"] for s in splits.values()),
        "repeated_passages": written["repeated_passages"],
        "splits": splits,
        "seconds": round(seconds, 3),
        "mb_per_s": round(raw_bytes / 1e6 / seconds, 3) if seconds > 0 else None,
    }


def _report(docs: list[Doc], metrics: dict) -> str:
    """reports/clean/report.md: a summary table, then every document not kept and why."""
    m = metrics
    dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items()) or "0"
    quarantined = ", ".join(f"{k} {v}" for k, v in m["quarantine_reasons"].items()) or "none"
    lines = [
        "# Clean stage report",
        "",
        "| | count |",
        "|---|---:|",
        f"| documents in | {m['docs_in']} |",
        f"| kept | {m['docs_out']} |",
        f"| exact duplicates | {m['exact_duplicates']} |",
        f"| near duplicates | {m['near_duplicates']} |",
        f"| dropped ({dropped}) | {sum(m['dropped'].values())} |",
        f"| quarantined ({quarantined}) | {m['quarantined']} |",
        f"| Gutenberg header/footer removed | {m['gutenberg_stripped']} |",
        f"| HTML stripped | {m['html_stripped']} |",
        f"| bytes in / out | {m['bytes_in']} / {m['bytes_out']} |",
        f"| passages (train / val / test) | {m['passages']} ({' / '.join(str(m['splits'][s]['docs']) for s in SPLITS)}) |",
        "",
        f"docs_in = kept + exact + near + dropped + quarantined: {m['docs_in']} = {m['docs_out']} + "
        f"{m['exact_duplicates']} + {m['near_duplicates']} + {sum(m['dropped'].values())} + {m['quarantined']}",
    ]
    sections = [
        ("Quarantined", "quarantined", lambda d: d.reason),
        ("Dropped", "dropped", lambda d: d.reason),
        ("Exact duplicates", "duplicate", lambda d: f"same text as `{d.duplicate_of}`"),
        (
            "Near duplicates",
            "near_duplicate",
            lambda d: f"{d.reason.removeprefix('near duplicate: ')} with `{d.duplicate_of}` (kept)",
        ),
    ]
    for title, outcome, why in sections:
        chosen = [d for d in docs if d.outcome == outcome]
        lines += ["", f"## {title} ({len(chosen)})", ""]
        lines += [f"- `{d.file}`: {why(d)}" for d in chosen] or ["none"]
    legacy = Counter(d.encoding for d in docs if d.encoding and d.encoding not in ("utf-8", "ascii"))
    if legacy:
        lines += ["", "## Encodings other than UTF-8", ""]
        lines += [f"- {enc}: {n} file(s)" for enc, n in sorted(legacy.items())]
    return "\n".join(lines) + "\n"


def _files_json(docs: list[Doc]) -> list[dict]:
    keys = ("file", "outcome", "reason", "duplicate_of", "chars", "encoding")
    return [{k: v for k, v in asdict(d).items() if k in keys} for d in docs]


def _write_reports(report_dir: Path, docs: list[Doc], metrics: dict) -> None:
    with atomic_dir(report_dir) as tmp:
        (tmp / "report.md").write_text(_report(docs, metrics), encoding="utf-8")
        (tmp / "files.json").write_text(
            json.dumps(_files_json(docs), indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def _nothing_usable(docs: list[Doc], report_dir: Path) -> str:
    why = Counter(d.outcome for d in docs)
    parts = ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(why.items()))
    return (
        f"no usable document remains: all {len(docs)} documents were dropped, quarantined or duplicates "
        f"({parts or 'no documents at all'}): see {report_dir / 'report.md'}"
    )


def clean_corpus(
    raw_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    report_dir: Path,
    params: DataParams,
) -> dict:
    """Run the whole stage; returns the metrics written to `metrics_path`. Raises CleanError (after
    writing the report) if no usable document remains; `out_dir` and `metrics_path` are then untouched."""
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with out_of_space_stops_stage(), scratch_dir(out_dir.parent, SCRATCH) as scratch:
        with open(scratch / "spill.txt", "w+b") as spill:
            docs = readdocuments(raw_dir, params, spill)
            deduplicate(docs, params, spill)
            raw_bytes = sum(_raw_size(raw_dir / name) for name in {d.file.partition("#")[0] for d in docs})
            if not any(d.outcome == "kept" for d in docs):
                empty = {"splits": {s: {"docs": 0, "bytes": 0} for s in SPLITS}, "repeated_passages": 0}
                _write_reports(report_dir, docs, _metrics(docs, raw_bytes, empty, time.perf_counter() - started))
                raise CleanError(_nothing_usable(docs, report_dir))
            with atomic_dir(out_dir) as tmp:
                written = write_splits(docs, params, spill, tmp)
                metrics = _metrics(docs, raw_bytes, written, time.perf_counter() - started)
                _write_reports(report_dir, docs, metrics)
                write_json(metrics_path, metrics)
    return metrics


def _raw_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def summarize(params: Params, layout: Layout) -> str:
    """Run the stage on data/raw; the line printed on success."""
    metrics = clean_corpus(layout.raw, layout.clean, layout.clean_metrics, layout.clean_reports, params.data)
    return (
        f"{metrics['docs_in']} documents in, {metrics['docs_out']} kept "
        f"({metrics['exact_duplicates']} exact and {metrics['near_duplicates']} near duplicates, "
        f"{sum(metrics['dropped'].values())} dropped, {metrics['quarantined']} quarantined); "
        f"{metrics['passages']} passages, {metrics['mb_per_s']} MB/s in {metrics['seconds']} s; "
        f"report: {layout.clean_reports / 'report.md'}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.clean [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("clean", summarize, argv)
