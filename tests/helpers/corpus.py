"""Tiny corpora tests write themselves: pseudo-English documents, a raw corpus folder, clean splits."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

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
