"""The passages the tokenizer trains on: about `tokenizer.train_sample_bytes` of the train split, drawn evenly.

A passage is drawn when a keyed hash of its text, read as a fraction of 2**64, is below `fraction` (the sample's
share of the split's bytes): the same passages whatever the chunking, the worker count or the engine, and the
same passage in the same draw wherever it sits in the corpus. The key matters: the clean stage puts a passage in
train by the plain SHA-256 of the same text (pipelines/common/splits.py), so train passages are exactly those
with a high one, and an unkeyed draw by it would keep none of them.

    >>> drawn("Some passage.", 0.25)
    True
    >>> sample_range({"source": "/p/data/clean/train.jsonl", "start": 0, "end": 16777309, "fraction": 0.25,
    ...               "part": "/p/data/.tokens.<pid>.<random>.tmp/.parts.<pid>.<random>/sample.00000.jsonl"})
    {'docs': ..., 'bytes': ..., 'bad_line': None}
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipelines.common.atomic import out_of_space_stops_stage
from pipelines.tokenize.ranges import read_range

KEY = b"quill tokenizer sample"


def drawn(text: str, fraction: float) -> bool:
    """Whether the passage is in a sample of `fraction` of them (all of them at 1)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=KEY).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def sample_range(task: dict) -> dict:
    """Copy the lines of one byte range whose passage is drawn to task["part"] (JSONL, as the split); how many
    passages and text bytes it kept, or the range's line number of the first line that is no clean record."""
    docs = size = 0
    with out_of_space_stops_stage(), open(task["part"], "wb") as out:
        for line_no, line, text in read_range(Path(task["source"]), task["start"], task["end"]):
            if text is None:
                return {"docs": docs, "bytes": size, "bad_line": line_no}
            if drawn(text, task["fraction"]):
                out.write(line if line.endswith(b"\n") else line + b"\n")  # the file's last line may lack one
                docs += 1
                size += len(text.encode("utf-8"))
    return {"docs": docs, "bytes": size, "bad_line": None}
