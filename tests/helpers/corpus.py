"""Tiny corpora tests write themselves: pseudo-English documents, a raw corpus folder, clean splits."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipelines.clean.stage import clean_corpus
from pipelines.common.params import DataParams

# A small vocabulary: random documents over it share almost no 3-word shingles, so they are not near duplicates.
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so what up out no about into them can "
    "only other new some could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against "
    "go came right used take three king queen crown sword castle river forest night morning winter summer storm "
    "ship sea harbour letter promise honour duty grief joy love hate fortune fate stars moon sun wind rain bread "
    "wine gold silver iron stone tower gate bridge road field garden rose lily oak willow horse hound falcon "
    "soldier captain merchant sailor scholar priest fool jester lord lady prince princess knight squire servant"
).split()


def make_document(rng: random.Random, paragraphs: int = 4) -> str:
    """Pseudo-English prose: sentences of random words, paragraphs separated by blank lines."""
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A folder of .txt/.md/.jsonl files of distinct documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc_{i:03d}.txt").write_text(make_document(rng), encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\n" + make_document(rng), encoding="utf-8")
    with open(root / "extra.jsonl", "w", encoding="utf-8") as f:
        for _ in range(5):
            f.write(json.dumps({"text": make_document(rng)}) + "\n")
    return root


def write_planted_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> dict[str, str]:
    """A folder of distinct documents in .txt, .jsonl and .txt.gz files in nested folders, plus planted copies: every
    seventh document again, exactly, in another file, and every fifth one with one word in twenty changed. Returns
    the planted copies: copy's document name (as the clean stage names it) -> its original's."""
    rng = random.Random(seed)
    docs = [make_document(rng, paragraphs=rng.randint(2, 6)) for _ in range(n_docs)]
    names, planted = [], {}
    jsonl: list[str] = []
    for i, text in enumerate(docs):
        if i % 4 == 3:  # every fourth document is a line of one .jsonl file
            jsonl.append(text)
            names.append(f"sub/more/docs.jsonl#L{len(jsonl)}")
        else:
            path = root / ("a" if i % 2 else "b") / f"doc_{i:03d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            names.append(f"{path.parent.name}/{path.name}")
    (root / "sub" / "more").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "more" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in jsonl))
    for i in range(0, n_docs, 7):
        name = f"z/exact_{i:03d}.txt.gz"
        (root / "z").mkdir(exist_ok=True)
        with gzip.open(root / name, "wt", encoding="utf-8") as f:
            f.write(docs[i])
        planted[name] = names[i]
    for i in range(2, n_docs, 5):
        words = docs[i].split(" ")
        for j in range(0, len(words), 20):
            words[j] = rng.choice(WORDS)
        name = f"z/near_{i:03d}.txt"
        (root / name).write_text(" ".join(words), encoding="utf-8")
        planted[name] = names[i]
    return planted


def raw_from_folder(folder: Path, root: Path) -> Path:
    """`<root>/data/raw` holding the folder's files and manifest.json, as the ingest stage writes them."""
    raw = root / "data" / "raw"
    shutil.copytree(folder, raw)
    entries = [
        {
            "file": path.relative_to(raw).as_posix(),
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source": "local:corpus",
            "text_field": "text",
        }
        for path in sorted(raw.rglob("*"), key=lambda p: p.relative_to(raw).as_posix())
        if path.is_file()
    ]
    (raw / "manifest.json").write_text(json.dumps({"files": entries, "skipped": []}, indent=1))
    return raw


def run_clean(root: Path, params: DataParams) -> dict:
    """The clean stage on `<root>/data/raw`, its outputs where the project layout puts them; its metrics."""
    return clean_corpus(
        root / "data" / "raw",
        root / "data" / "clean",
        root / "metrics" / "clean.json",
        root / "reports" / "clean",
        params,
    )


def make_verse(rng: random.Random) -> str:
    """A document of short lines (5-9 words), like verse: cloze and next-line items need lines."""
    words = make_document(rng, paragraphs=3).split()
    lines, i = [], 0
    while i < len(words):
        n = rng.randint(5, 9)
        lines.append(" ".join(words[i : i + n]))
        i += n
    return "\n".join(lines) + "\n"


def write_clean(
    clean_dir: Path,
    n_train: int = 60,
    n_val: int = 4,
    n_test: int = 4,
    seed: int = 0,
    extra: Sequence[str] = (),
    verse: bool = False,
) -> dict[str, list[str]]:
    """data/clean/{train,val,test}.jsonl as the clean stage writes them; `extra` documents join the train split."""
    rng = random.Random(seed)
    doc = (lambda: make_verse(rng)) if verse else (lambda: make_document(rng))
    splits = {
        "train": [doc() for _ in range(n_train)] + list(extra),
        "val": [doc() for _ in range(n_val)],
        "test": [doc() for _ in range(n_test)],
    }
    clean_dir.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        with open(clean_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"id": f"{split}-{i}", "text": text, "source": "fixture"}) + "\n")
    return splits
