"""pipelines/tokenize/sample.py: the tokenizer's training sample is an even, deterministic draw of train passages."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from pipelines.common.splits import split_of
from pipelines.tokenize.ranges import byte_ranges, concatenate
from pipelines.tokenize.sample import drawn, sample_range

PASSAGES = [f"passage {i}: " + " ".join(random.Random(i).choices("abcdefgh", k=20)) for i in range(4000)]


def test_a_draw_keeps_about_its_fraction_and_always_the_same_passages():
    for fraction in (0.05, 0.25, 0.6):
        kept = [p for p in PASSAGES if drawn(p, fraction)]
        assert abs(len(kept) / len(PASSAGES) - fraction) < 0.03
        assert kept == [p for p in PASSAGES if drawn(p, fraction)]
    assert all(drawn(p, 1.0) for p in PASSAGES) and not any(drawn(p, 0.0) for p in PASSAGES)
    assert set(p for p in PASSAGES if drawn(p, 0.05)) <= set(p for p in PASSAGES if drawn(p, 0.25))


def test_the_draw_is_independent_of_the_split_assignment():
    """Train passages are those whose plain SHA-256 is high (pipelines/common/splits.py): a draw by that same
    hash would keep none of them at a small fraction; the keyed draw keeps its share of them."""
    train = [p for p in PASSAGES if split_of(hashlib.sha256(p.encode()).digest(), 0.05, 0.05) == "train"]
    kept = [p for p in train if drawn(p, 0.05)]
    assert abs(len(kept) / len(train) - 0.05) < 0.02


@pytest.mark.parametrize("chunk_bytes", [300, 10**6])
def test_the_sample_is_the_same_whatever_the_chunks(tmp_path, chunk_bytes):
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(PASSAGES[:300])))
    tasks = [
        {"source": str(source), "start": s, "end": e, "fraction": 0.3, "part": str(tmp_path / f"{i}.jsonl")}
        for i, (s, e) in enumerate(byte_ranges(source, chunk_bytes))
    ]
    results = [sample_range(task) for task in tasks]
    concatenate([tmp_path / f"{i}.jsonl" for i in range(len(tasks))], tmp_path / "sample.jsonl")
    expected = [p for p in PASSAGES[:300] if drawn(p, 0.3)]
    assert [json.loads(line)["text"] for line in open(tmp_path / "sample.jsonl")] == expected
    assert sum(r["docs"] for r in results) == len(expected) and not any(r["bad_line"] for r in results)
    assert sum(r["bytes"] for r in results) == sum(len(p.encode()) for p in expected)
