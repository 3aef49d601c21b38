"""Encoding one byte range of a clean split to a part file of token ids: the tokenize stage's task.

The task loads the tokenizer from its file and knows nothing of the others, so it runs alike in the stage's own
process, a pool worker or a Ray worker; the stage joins the parts in order into `{split}.bin`.

    >>> encode_range({"source": "/p/data/clean/val.jsonl", "start": 0, "end": 371190, "part": "/p/.../val.00000.bin",
    ...               "tokenizer": "/p/.../tokenizer.json", "eot_id": 0, "dtype": "uint16", "batch_size": 256})
    {'docs': 184, 'bytes': 337930, 'tokens': 112515, 'bad_line': None, 'altered': None}
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

from pipelines.common.atomic import out_of_space_stops_stage
from pipelines.tokenize.ranges import read_range
from pipelines.tokenize.roundtrip import RoundTrip

T = TypeVar("T")


def batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def loaded(path: str) -> tuple[Tokenizer, RoundTrip]:
    """The tokenizer in `path` (and its round-trip check), loaded once per process: each tokenizer that encodes
    keeps about 4 MB after it is dropped, so one per task grew a worker by 100 MB over a 1 GB corpus."""
    stat = os.stat(path)
    return _load(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1)
def _load(path: str, mtime_ns: int, size: int) -> tuple[Tokenizer, RoundTrip]:
    tokenizer = Tokenizer.from_file(path)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" typed in a document is text, not a separator
    return tokenizer, RoundTrip(tokenizer)


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, encoded in parallel by the Rust library's thread pool (no offsets computed)."""
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def encode_range(task: dict) -> dict:
    """Encode the documents of one byte range in batches to task["part"], each followed by EOT: their counts, or
    where the range stops being encodable (`bad_line`: a line that is no clean record, its line number within the
    range; `altered`: [the batch's first document, the document within the batch], numbered from 1 in the range).
    """
    tokenizer, round_trip = loaded(task["tokenizer"])
    dtype = np.dtype(task["dtype"])
    stats = {"docs": 0, "bytes": 0, "tokens": 0, "bad_line": None, "altered": None}
    records = read_range(Path(task["source"]), task["start"], task["end"])
    with out_of_space_stops_stage(), open(task["part"], "wb") as out:
        for batch in batches(records, task["batch_size"]):
            bad = next((line_no for line_no, _, text in batch if text is None), None)
            if bad is not None:
                return stats | {"bad_line": bad}
            texts = [text for _, _, text in batch]
            ids = encode_documents(tokenizer, texts)
            counts = np.fromiter(map(len, ids), np.int64, len(ids))
            tokens = np.fromiter(chain.from_iterable(ids), np.int64, int(counts.sum()))
            encoded = [text.encode("utf-8") for text in texts]
            altered = round_trip.first_altered(texts, encoded, tokens, counts)
            if altered is not None:
                return stats | {"altered": [stats["docs"] + 1, altered + 1]}
            flat = np.insert(tokens, np.cumsum(counts), task["eot_id"]).astype(dtype)  # each document, then EOT
            flat.tofile(out)
            stats["docs"] += len(texts)
            stats["bytes"] += sum(map(len, encoded))
            stats["tokens"] += len(flat)
    return stats
