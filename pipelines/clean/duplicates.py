"""The clean stage's dedup steps over shards: signature -> bucket -> cluster -> filter.

Each step is a task over files of pipelines/clean/shuffle.py, run by pipelines/common/engine.py:

1. `exact_part(p)`: the SHA-256 rows of partition p sorted; every document but the first of a hash is an exact
   duplicate of that first one (writes `exact/<p>.npy`: (first, duplicate) pairs).
2. `bucket_part(p)`: the LSH band rows of partition p, exact duplicates left out; documents sharing a bucket are
   candidate pairs (writes `pairs/<p>.npy`).
3. `verify(pairs)`: the exact Jaccard similarity of each candidate pair's shingle sets, as the read step stored
   them; pairs at or above the threshold are kept.
4. The stage joins the verified pairs into clusters in one process (`dedup.clusters`; its size is the number of
   near duplicates, not of documents) and keeps the first document of each, as before.

Documents at or past `cut` (data.max_docs / max_bytes) take part in nothing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipelines.clean import dedup, shuffle
from pipelines.clean.shards import SHINGLE, shard_folder
from pipelines.common.params import DataParams

SHINGLE_CACHE = 1024  # shingle sets a verify task keeps
SIMILAR_ROWS = np.dtype([("a", "<u8"), ("b", "<u8"), ("jaccard", "<f8")])


def exact_part(task: dict) -> int:
    """Step 1 for one partition; the number of exact duplicates found."""
    scratch, part = Path(task["scratch"]), task["part"]
    found = []
    for rows in shuffle.read_partition(scratch / "sha", part, shuffle.SHA_ROWS, "sha"):
        rows = np.sort(rows[rows["key"] < task["cut"]], order=["sha", "key"])
        later = shuffle.repeats(rows["sha"])  # a row whose hash the one before it has
        first = rows["key"][np.maximum.accumulate(np.where(~later, np.arange(len(rows)), 0))]
        pairs = np.empty(int(later.sum()), dtype=shuffle.PAIR_ROWS)
        pairs["a"], pairs["b"] = first[later], rows["key"][later]
        found.append(pairs)
    (scratch / "exact").mkdir(exist_ok=True)
    np.save(scratch / "exact" / f"{part:04d}.npy", np.concatenate(found), allow_pickle=False)
    return sum(map(len, found))


def bucket_part(task: dict) -> int:
    """Step 2 for one partition; the number of candidate pairs."""
    scratch, part = Path(task["scratch"]), task["part"]
    duplicates = np.load(scratch / "exact_duplicates.npy", allow_pickle=False)
    found = []
    for rows in shuffle.read_partition(scratch / "bands", part, shuffle.BAND_ROWS, "hash"):
        rows = rows[(rows["key"] < task["cut"]) & ~np.isin(rows["key"], duplicates)]
        candidates = dedup.candidate_pairs(rows["hash"], rows["key"])
        pairs = np.empty(len(candidates), dtype=shuffle.PAIR_ROWS)
        pairs["a"], pairs["b"] = candidates[:, 0], candidates[:, 1]
        found.append(pairs)
    (scratch / "pairs").mkdir(exist_ok=True)
    np.save(scratch / "pairs" / f"{part:04d}.npy", np.concatenate(found), allow_pickle=False)
    return sum(map(len, found))


def verify(task: dict) -> int:
    """Step 3 for pairs[start:stop] of `<scratch>/<pairs>.npy`: writes `<out>` with the exact Jaccard of every
    pair (`keep_all`) or of the pairs at or above the threshold; the number written."""
    scratch = Path(task["scratch"])
    params: DataParams = task["params"]
    pairs = np.load(scratch / task["pairs"], mmap_mode="r")[task["start"] : task["stop"]]
    similar = np.empty(len(pairs), dtype=SIMILAR_ROWS)
    similar["a"], similar["b"] = pairs["a"], pairs["b"]
    with ShingleReader(scratch) as shingles:
        similar["jaccard"] = [dedup.jaccard(shingles(int(a)), shingles(int(b))) for a, b in zip(pairs["a"], pairs["b"])]
    if not task.get("keep_all"):
        similar = similar[similar["jaccard"] >= params.dedup.jaccard_threshold]
    np.save(scratch / task["out"], similar, allow_pickle=False)
    return len(similar)


class ShingleReader:
    """key -> the document's shingle set, as the read step stored it in its shard's shingles.bin. Read with
    plain reads, the last SHINGLE_CACHE kept (pairs come sorted by their first key): a memory map would keep
    every page it touched resident, hundreds of MB once there are many candidates."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.files: dict[int, BinaryIO] = {}
        self.locations: dict[int, np.ndarray] = {}
        self._cached = lru_cache(maxsize=SHINGLE_CACHE)(self._read)

    def __call__(self, key: int) -> np.ndarray:
        return self._cached(key)

    def _read(self, key: int) -> np.ndarray:
        shard, index = int(shuffle.shard_of(key)), key & ((1 << shuffle.INDEX_BITS) - 1)
        if shard not in self.files:
            folder = shard_folder(self.scratch, shard)
            self.files[shard] = open(folder / "shingles.bin", "rb")
            self.locations[shard] = np.load(folder / "loc.npy", allow_pickle=False)
        at, n = int(self.locations[shard]["shingles_at"][index]), int(self.locations[shard]["shingles"][index])
        self.files[shard].seek(at * SHINGLE.itemsize)
        return np.fromfile(self.files[shard], dtype=SHINGLE, count=n)

    def __enter__(self) -> ShingleReader:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        # the cache holds this reader (a cycle): emptied now, its arrays go with the task, not at the next collection
        self._cached.cache_clear()
        self.files.clear()
        self.locations.clear()
