"""A synthetic raw corpus of any size for the data-stage benchmarks, with planted exact and near duplicates.

Deterministic from a seed. Documents are English-like prose (sentences of a 5,000-word vocabulary with Zipf
frequencies: 60 function words, then pseudo-words), 200 B to 50 KB with log-normal lengths, in nested folders:
one document per .txt file or many per .jsonl file, some of either gzipped. About 5 % of documents get an exact
copy (the same text, elsewhere) and 5 % a near copy (5-10 % of words substituted, or a paragraph removed or
added: Jaccard of word 3-shingles well above the clean stage's 0.2); only documents of 1 KB or more get copies,
so that none is dropped as too short. Unrelated documents share few shingles (Jaccard far below 0.2).

    >>> summary = write_corpus(Path("/tmp/c"), megabytes=10, seed=0)   # /tmp/c/corpus/..., /tmp/c/truth.json

truth.json lists every planted copy: {"copy": id, "of": id, "kind": "exact" | "near", "change": ...}, where an id
is the document's path under corpus/, plus "#L<line>" for a .jsonl line (as the clean stage names documents,
below the ingest stage's "local-corpus/").
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FUNCTION_WORDS = (
    "the of and to a in that is was he for it with as his on be at by i this had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about"
).split()
SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ka ke ki ko la le li lo lu ma me mi mo na ne ni no ra re ri ro "
    "sa se si so ta te ti to va ve vi wa we wi ya yo za ze th sh ch an en in on ar er or st pr gr tr"
).split()
VOCAB_SIZE = 5000
ZIPF = 1.0
MIN_BYTES, MAX_BYTES = 200, 50_000
MEDIAN_BYTES, SIGMA = 3000, 1.0  # log-normal document length: median 3 KB, mean ~5 KB
COPY_MIN_BYTES = 1000  # documents shorter than this get no planted copy
EXACT, NEAR = 0.05, 0.05  # fraction of documents with a planted exact / near copy
TXT_SHARE = 0.3  # of documents: alone in a .txt file; the rest are lines of .jsonl files
JSONL_DOCS = (20, 1000)  # documents per .jsonl file (uniform)
GZIP_SHARE = 0.1  # of files, gzipped


@dataclass
class Plan:
    """One document to write: an original (src = its own index) or a planted copy of document `src`."""

    src: int
    words: int
    kind: str = "original"  # original | exact | near
    id: str = ""  # where it was written (set while writing)


class Vocabulary:
    """Words as bytes (lower and capitalised) with Zipf weights, and the mean bytes a word takes in prose."""

    def __init__(self, rng: np.random.Generator) -> None:
        words = list(FUNCTION_WORDS)
        seen = set(words)
        while len(words) < VOCAB_SIZE:
            word = "".join(rng.choice(SYLLABLES, size=rng.choice([1, 2, 2, 2, 3, 3, 4])))
            if word not in seen:
                seen.add(word)
                words.append(word)
        weights = 1.0 / np.arange(1, len(words) + 1) ** ZIPF
        self.cum = np.cumsum(weights / weights.sum())
        self.lower = np.array([w.encode() for w in words], dtype=object)
        self.upper = np.array([w.capitalize().encode() for w in words], dtype=object)
        self.bytes_per_word = float(np.dot(weights / weights.sum(), [len(w) for w in words])) + 1.15

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cum, rng.random(n)), len(self.cum) - 1)


@dataclass
class Doc:
    """A document as arrays over its words: word ids, and where sentences and paragraphs end."""

    idx: np.ndarray
    sentence_end: np.ndarray
    paragraph_end: np.ndarray
    comma: np.ndarray

    def __len__(self) -> int:
        return len(self.idx)

    def cut(self, keep: np.ndarray) -> Doc:
        return Doc(self.idx[keep], self.sentence_end[keep], self.paragraph_end[keep], self.comma[keep])

    @staticmethod
    def join(parts: list[Doc]) -> Doc:
        return Doc(*(np.concatenate([getattr(p, f) for p in parts]) for f in Doc.__dataclass_fields__))


def make_doc(vocab: Vocabulary, rng: np.random.Generator, n: int) -> Doc:
    """n words of prose: sentences of ~12 words, paragraphs of ~5 sentences."""
    sentence_end = rng.random(n) < 1 / 12
    sentence_end[-1] = True
    paragraph_end = sentence_end & (rng.random(n) < 1 / 5)
    paragraph_end[-1] = True
    comma = ~sentence_end & (rng.random(n) < 0.06)
    return Doc(vocab.draw(rng, n), sentence_end, paragraph_end, comma)


def render(vocab: Vocabulary, doc: Doc) -> bytes:
    """The document's text: capitalised sentences, one paragraph a line, a blank line between paragraphs."""
    n = len(doc)
    start = np.empty(n, dtype=bool)
    start[0] = True
    start[1:] = doc.sentence_end[:-1]
    seps = np.full(n, b" ", dtype=object)
    seps[doc.comma] = b", "
    seps[doc.sentence_end] = b". "
    seps[doc.paragraph_end] = b".\n\n"
    seps[-1] = b".\n"
    out = np.empty(2 * n, dtype=object)
    out[0::2] = np.where(start, vocab.upper[doc.idx], vocab.lower[doc.idx])
    out[1::2] = seps
    return b"".join(out.tolist())


def near_copy(vocab: Vocabulary, rng: np.random.Generator, doc: Doc) -> tuple[Doc, str]:
    """A near duplicate of doc and what changed: 5-10 % of words substituted, or a paragraph removed or added
    (at most a fifth of the words)."""
    ends = np.flatnonzero(doc.paragraph_end)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if len(ends) >= 3 and rng.random() < 0.4:
        if rng.random() < 0.5:
            small = np.flatnonzero(ends - starts + 1 <= len(doc) // 5)
            if len(small):
                p = rng.choice(small)
                keep = np.ones(len(doc), dtype=bool)
                keep[starts[p] : ends[p] + 1] = False
                return doc.cut(keep), f"paragraph of {ends[p] - starts[p] + 1} words removed"
        words = int(rng.integers(20, max(21, len(doc) // 6)))
        added = make_doc(vocab, rng, words)
        at = int(rng.choice(ends)) + 1
        head, tail = doc.cut(np.arange(len(doc)) < at), doc.cut(np.arange(len(doc)) >= at)
        return Doc.join([head, added, tail]), f"paragraph of {words} words added"
    rate = rng.uniform(0.05, 0.10)
    changed = rng.random(len(doc)) < rate
    idx = doc.idx.copy()
    idx[changed] = vocab.draw(rng, int(changed.sum()))
    return Doc(idx, doc.sentence_end, doc.paragraph_end, doc.comma), f"{changed.mean():.1%} of words substituted"


def plan(vocab: Vocabulary, rng: np.random.Generator, target_bytes: float) -> list[Plan]:
    """Originals and their planted copies, in a random order, summing to about target_bytes."""
    docs: list[Plan] = []
    total = 0.0
    eligible = 1 - _lognormal_below(COPY_MIN_BYTES)
    while total < target_bytes:
        size = float(np.clip(rng.lognormal(np.log(MEDIAN_BYTES), SIGMA), MIN_BYTES, MAX_BYTES))
        n = max(8, round(size / vocab.bytes_per_word))
        i = len(docs)
        docs.append(Plan(i, n))
        total += size
        if size >= COPY_MIN_BYTES:
            for kind, share in (("exact", EXACT), ("near", NEAR)):
                if rng.random() < share / eligible:
                    docs.append(Plan(i, n, kind))
                    total += size
    return [docs[i] for i in rng.permutation(len(docs))]


def _lognormal_below(x: float) -> float:
    return 0.5 * (1 + math.erf(math.log(x / MEDIAN_BYTES) / (SIGMA * math.sqrt(2))))


def write_corpus(out: Path, megabytes: float, seed: int = 0) -> dict:
    """Write out/corpus/ (about `megabytes` MB on disk) and out/truth.json; returns truth.json's summary and the
    seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    vocab = Vocabulary(rng)
    docs = plan(vocab, rng, megabytes * 1e6)
    by_src = {d.src: d for d in docs if d.kind == "original"}
    corpus = out / "corpus"
    planted: list[dict] = []
    counts = {"files": 0, "gzip_files": 0, "jsonl_files": 0, "txt_files": 0, "bytes": 0, "text_bytes": 0}

    def text_of(d: Plan) -> bytes:
        doc = make_doc(vocab, np.random.default_rng([seed, d.src]), d.words)  # the same words for every copy
        if d.kind == "near":
            doc, change = near_copy(vocab, np.random.default_rng([seed, d.src, 1]), doc)
            planted.append({"copy": d.id, "of": d.src, "kind": "near", "change": change})
        elif d.kind == "exact":
            planted.append({"copy": d.id, "of": d.src, "kind": "exact", "change": "none"})
        return render(vocab, doc)

    def write_file(batch: list[Plan], jsonl: bool) -> None:
        number = counts["files"]
        folder = corpus / f"part-{number // 2000:03d}" / f"group-{number // 100 % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        gz = rng.random() < GZIP_SHARE
        name = (f"docs-{number:07d}.jsonl" if jsonl else f"doc-{number:07d}.txt") + (".gz" if gz else "")
        rel = f"{folder.relative_to(corpus).as_posix()}/{name}"
        parts = []
        for line, d in enumerate(batch, start=1):
            d.id = f"{rel}#L{line}" if jsonl else rel
            text = text_of(d)
            counts["text_bytes"] += len(text)
            # the text holds letters, spaces, ".,\n" only: a newline is all JSON needs escaped
            parts.append(b'{"text": "' + text.replace(b"\n", b"\\n") + b'"}\n' if jsonl else text)
        data = b"".join(parts)
        if gz:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        (folder / name).write_bytes(data)
        counts["bytes"] += len(data)
        counts["files"] += 1
        counts["gzip_files"] += gz
        counts["jsonl_files" if jsonl else "txt_files"] += 1

    lines: list[Plan] = []  # the next .jsonl file's documents
    lines_per_file = int(rng.integers(*JSONL_DOCS))
    for d in docs:
        if rng.random() < TXT_SHARE:
            write_file([d], jsonl=False)
            continue
        lines.append(d)
        if len(lines) == lines_per_file:
            write_file(lines, jsonl=True)
            lines, lines_per_file = [], int(rng.integers(*JSONL_DOCS))
    if lines:
        write_file(lines, jsonl=True)
    for p in planted:
        p["of"] = by_src[p["of"]].id
    summary = {
        "seed": seed,
        "megabytes": megabytes,
        "documents": len(docs),
        "exact_copies": sum(p["kind"] == "exact" for p in planted),
        "near_copies": sum(p["kind"] == "near" for p in planted),
        **counts,
    }
    planted.sort(key=lambda p: p["copy"])
    (out / "truth.json").write_text(json.dumps({**summary, "planted": planted}, indent=1) + "\n")
    return {**summary, "seconds": round(time.perf_counter() - started, 2)}
