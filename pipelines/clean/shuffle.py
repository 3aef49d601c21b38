"""Rows exchanged between the clean stage's steps: numpy record files partitioned by a hash, on disk.

A map task (one shard of raw files) writes its rows for partition p to `<folder>/<p>/<shard>.npy`; a reduce
task reads partition p from every shard and so sees every row with that hash (the shuffle of a MapReduce, as
datatrove's MinHash dedup does it with files). No process ever holds more than one partition, and a Ray
cluster's workers exchange rows through the project folder they all see. Files are plain .npy (never pickles).

Keys order documents: `key = shard << 32 | index in shard`, so sorting keys sorts documents in the corpus's
sorted path order, however the corpus was cut into shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHA_ROWS = np.dtype([("sha", "S32"), ("key", "<u8")])  # exact dedup: a kept document's SHA-256
BAND_ROWS = np.dtype([("hash", "<u8"), ("key", "<u8")])  # near dedup: one LSH bucket of a document
PAIR_ROWS = np.dtype([("a", "<u8"), ("b", "<u8")])  # two documents (a < b)
PASSAGE_ROWS = np.dtype([("sha", "S32"), ("order", "<u8")])  # repeated passages: a passage's SHA-256
INDEX_BITS = 32  # documents per shard < 2**32


def key(shard: int, index: int) -> int:
    return shard << INDEX_BITS | index


def shard_of(keys: np.ndarray | int):
    return keys >> INDEX_BITS


def partition_of(hashes: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each row from a uint64 hash, or from the first 8 bytes of a SHA-256."""
    if hashes.dtype.kind == "S":
        hashes = np.frombuffer(hashes.tobytes(), dtype=">u8")[:: hashes.dtype.itemsize // 8]
    return (hashes % np.uint64(parts)).astype(np.int64)


def write_partitioned(folder: Path, shard: int, rows: np.ndarray, partitions: np.ndarray, parts: int) -> None:
    """rows[i] goes to partition partitions[i]; empty partitions get no file."""
    for p in np.unique(partitions).tolist():
        (folder / f"{p:04d}").mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{p:04d}" / f"{shard:06d}.npy", rows[partitions == p], allow_pickle=False)


def read_partition(folder: Path, part: int, dtype: np.dtype) -> np.ndarray:
    """Every shard's rows of one partition."""
    files = sorted((folder / f"{part:04d}").glob("*.npy"))
    if not files:
        return np.empty(0, dtype=dtype)
    return np.concatenate([np.load(f, allow_pickle=False) for f in files])


def repeats(values: np.ndarray) -> np.ndarray:
    """Of sorted values: True where a value equals the one before it (every copy but the first)."""
    return np.r_[False, values[1:] == values[:-1]] if len(values) else np.zeros(0, dtype=bool)
