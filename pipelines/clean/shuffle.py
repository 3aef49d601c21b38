"""Rows exchanged between the clean stage's steps: numpy record files partitioned by a hash, on disk.

A map task (one shard of raw files) writes its rows for partition p to `<folder>/<p>/<shard>-<n>.npy`; a reduce
task reads partition p from every shard and so sees every row with that hash (the shuffle of a MapReduce, as
datatrove's MinHash dedup does it with files). No process ever holds more than one partition, and a Ray
cluster's workers exchange rows through the project folder they all see. Files are plain .npy (never pickles).

Keys order documents: `key = shard << 32 | index in shard`, so sorting keys sorts documents in the corpus's
sorted path order, however the corpus was cut into shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

SHA_ROWS = np.dtype([("sha", "S32"), ("key", "<u8")])  # exact dedup: a kept document's SHA-256
BAND_ROWS = np.dtype([("hash", "<u8"), ("key", "<u8")])  # near dedup: one LSH bucket of a document
PAIR_ROWS = np.dtype([("a", "<u8"), ("b", "<u8")])  # two documents (a < b)
PASSAGE_ROWS = np.dtype([("sha", "S32"), ("order", "<u8")])  # repeated passages: a passage's SHA-256
INDEX_BITS = 32  # documents per shard < 2**32
PASS_BYTES = 4 << 20  # rows a reduce task sorts at once (its peak memory is a few times this)


def key(shard: int, index: int) -> int:
    return shard << INDEX_BITS | index


def shard_of(keys: np.ndarray | int):
    return keys >> INDEX_BITS


def partition_of(hashes: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each row from a uint64 hash, or from the first 8 bytes of a SHA-256."""
    if hashes.dtype.kind == "S":
        hashes = np.frombuffer(hashes.tobytes(), dtype=">u8")[:: hashes.dtype.itemsize // 8]
    return (hashes % np.uint64(parts)).astype(np.int64)


def write_partitioned(folder: Path, name: str, rows: np.ndarray, partitions: np.ndarray) -> None:
    """rows[i] goes to `<folder>/<partitions[i]>/<name>.npy`; empty partitions get no file. `name` is unique to
    the writing task (its shard, and which of its flushes)."""
    for p in np.unique(partitions).tolist():
        (folder / f"{p:04d}").mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{p:04d}" / f"{name}.npy", rows[partitions == p], allow_pickle=False)


def read_partition(folder: Path, part: int, dtype: np.dtype, field: str) -> Iterator[np.ndarray]:
    """Every shard's rows of one partition, in passes of at most about PASS_BYTES: rows whose `field` is equal
    come in the same pass (a pass takes the rows whose field's next hash bits fall in its slice), so a reduce
    task's memory is bounded however large its partition grew. At least one pass, maybe empty."""
    files = sorted((folder / f"{part:04d}").glob("*.npy"))
    stored = [np.load(f, mmap_mode="r", allow_pickle=False) for f in files]
    passes = max(1, -(-sum(a.nbytes for a in stored) // PASS_BYTES))
    for i in range(passes):
        chosen = [a[_sub_hash(a[field]) % np.uint64(passes) == i] if passes > 1 else np.asarray(a) for a in stored]
        yield np.concatenate(chosen) if chosen else np.empty(0, dtype=dtype)


def _sub_hash(values: np.ndarray) -> np.ndarray:
    """Hash bits not used by partition_of: bytes 8-16 of a SHA-256, the high half of a uint64 hash."""
    if values.dtype.kind == "S":
        return np.frombuffer(values.tobytes(), dtype=">u8")[1 :: values.dtype.itemsize // 8]
    return values >> np.uint64(32)


def repeats(values: np.ndarray) -> np.ndarray:
    """Of sorted values: True where a value equals the one before it (every copy but the first)."""
    return np.r_[False, values[1:] == values[:-1]] if len(values) else np.zeros(0, dtype=bool)
