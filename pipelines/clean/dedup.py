"""Near-duplicate detection for the clean stage: word shingles, MinHash LSH, exact verification.

A document becomes a set of 32-bit hashes of its lower-cased word k-shingles (`shingle_words`),
summarised by a `datasketch` MinHash, whose bands (datasketch's MinHashLSH shape) are hashed into buckets.
Documents sharing a bucket are candidate pairs; each candidate is checked with the exact Jaccard similarity
of the two shingle sets, so a false candidate costs time, never a wrong answer. Verified pairs are joined
into clusters (connected components) and the first document of each cluster, in the caller's order, is kept.
Each step is a function of its own, so the clean stage runs them over shards (signature -> bucket ->
cluster -> filter) and `near_duplicates` runs them in memory:

    >>> a = sketch(["to be or not to be that is the question"], shingle_words=3, num_perm=128)
    >>> b = sketch(["to be or not to bee that is the question"], shingle_words=3, num_perm=128)
    >>> near_duplicates([a, b], threshold=0.2, num_perm=128)
    {1: (0, 0.4545)}

Shingle hashes are stable across runs and machines (CRC-32 of each word, mixed in numpy), so the
clusters, and the stage's outputs, are reproducible.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix  # the finalizer MinHash.update_batch applies before its permutations

from pipelines.clean.shuffle import repeats

SEED = 1  # MinHash permutations; fixed so that results are reproducible
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative): candidates are verified, so favour recall
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_CRC: dict[str, int] = {}  # word -> CRC-32, across the documents of this process
_CRC_WORDS = 50_000  # about 5 MB: the words most text is made of
_BATCH = 1 << 15  # shingles per MinHash update: bounds the (batch, num_perm) temporary
ALL_PAIRS = 64  # buckets up to this many documents are verified pair by pair


@dataclass
class Sketch:
    shingles: np.ndarray  # sorted unique uint32 shingle hashes
    minhash: MinHash


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique of a 1-D array by sorting: numpy 2's np.unique hashes first, several times slower on the
    near-distinct hashes of shingles and keys."""
    ordered = np.sort(values)
    return ordered[~repeats(ordered)]


def _word_hashes(text: str) -> np.ndarray:
    words = _WORD.findall(text.lower())
    new = set(words).difference(_CRC)
    if len(_CRC) + len(new) > _CRC_WORDS:
        _CRC.clear()  # a bounded cache: the common words come back at once
        new = set(words)
    for word in new:
        _CRC[word] = zlib.crc32(word.encode("utf-8"))
    return np.fromiter(map(_CRC.__getitem__, words), dtype=np.uint64, count=len(words))


def _shingle_hashes(words: np.ndarray, k: int) -> np.ndarray:
    """uint32 hash of every run of k consecutive word hashes (of all words, if fewer than k)."""
    k = min(k, len(words))
    if k == 0:
        return np.empty(0, dtype=np.uint32)
    n = len(words) - k + 1
    x = np.zeros(n, dtype=np.uint64)
    for i in range(k):
        x = (x ^ words[i : i + n]) * _MIX
        x ^= x >> np.uint64(29)
    return (x >> np.uint64(32)).astype(np.uint32)


class Shingler:
    """Streaming shingle set: `feed` text pieces that end between words, then `finish`."""

    def __init__(self, shingle_words: int) -> None:
        self.k = shingle_words
        self._tail = np.empty(0, dtype=np.uint64)  # the last k-1 words, to shingle across pieces
        self._parts: list[np.ndarray] = []
        self._size = 0
        self._words_seen = 0

    def feed(self, text: str) -> None:
        words = np.concatenate([self._tail, _word_hashes(text)])
        self._words_seen += len(words) - len(self._tail)
        if len(words) >= self.k:
            self._parts.append(_shingle_hashes(words, self.k))
            self._size += len(self._parts[-1])
            if self._size > 1 << 22:  # compact: keep memory near the number of distinct shingles
                self._parts = [sorted_unique(np.concatenate(self._parts))]
                self._size = len(self._parts[0])
        self._tail = words[len(words) - (self.k - 1) :] if self.k > 1 else words[:0]

    def finish(self) -> np.ndarray:
        if not self._parts and self._words_seen:  # fewer words than k: one shingle of them all
            self._parts.append(_shingle_hashes(self._tail, self.k))
        return sorted_unique(np.concatenate(self._parts)) if self._parts else np.empty(0, dtype=np.uint32)


@cache
def _scheme(num_perm: int) -> tuple[str, np.ndarray]:
    """The hashing scheme and seeded permutations every MinHash shares: drawn once, not once per document (a
    third of its cost)."""
    template = MinHash(num_perm=num_perm, seed=SEED, hashfunc=int)
    return template.scheme, template.permutations


def minhash(shingles: np.ndarray, num_perm: int) -> MinHash:
    """datasketch's MinHash of the shingle hashes (hashfunc=int: they are 32-bit hashes already). Under its
    default affine32 scheme the update is applied here to the whole array: `update_batch` calls the hash
    function once per shingle in Python; tests/unit/pipelines/clean/test_dedup.py checks both agree."""
    scheme, permutations = _scheme(num_perm)
    m = MinHash(num_perm=num_perm, seed=SEED, hashfunc=int, permutations=permutations, scheme=scheme)
    a, b = permutations
    for start in range(0, len(shingles), _BATCH):
        batch = shingles[start : start + _BATCH]
        if scheme == "affine32":
            mixed = _fmix(batch.astype(np.uint32).reshape(-1, 1), 32)
            m.hashvalues = np.minimum(m.hashvalues, (mixed * a + b).min(axis=0))
        else:
            m.update_batch(batch.tolist())
    return m


def sketch(chunks: Iterable[str], shingle_words: int, num_perm: int) -> Sketch:
    """Shingle set and MinHash of a document given as text pieces that end between words."""
    shingler = Shingler(shingle_words)
    for chunk in chunks:
        shingler.feed(chunk)
    shingles = shingler.finish()
    return Sketch(shingles, minhash(shingles, num_perm))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique arrays."""
    if len(a) > len(b):
        a, b = b, a
    if len(a) == 0:
        return 0.0
    idx = np.minimum(np.searchsorted(b, a), len(b) - 1)
    inter = int(np.count_nonzero(b[idx] == a))
    return inter / (len(a) + len(b) - inter)


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold: two documents are candidates
    when all `rows` MinHash values of at least one band agree."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def band_hashes(m: MinHash, bands: int, rows: int) -> np.ndarray:
    """One uint64 per band: a hash of the band's index and its `rows` MinHash values. Equal hashes put two
    documents in one LSH bucket (a 64-bit collision only adds a candidate, which verification rejects)."""
    values = m.hashvalues[: bands * rows].astype(np.uint64).reshape(bands, rows)
    h = (np.arange(bands, dtype=np.uint64) + np.uint64(1)) * _MIX
    for j in range(rows):
        h = (h ^ values[:, j]) * _MIX
        h ^= h >> np.uint64(29)
    return h


def candidate_pairs(hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(a, b) key pairs, a < b, of documents that share a bucket: `hashes[i]` is a bucket of document `keys[i]`.
    Every pair of a bucket up to ALL_PAIRS documents; in a larger one (a flood of near copies), each document
    with the bucket's first and with its predecessor, which links the bucket in linear time."""
    order = np.lexsort((keys, hashes))
    h, k = hashes[order], keys[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    ends = np.r_[starts[1:], len(h)]
    pairs = []
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        group = sorted_unique(k[start:end])
        if len(group) < 2:
            continue
        if len(group) <= ALL_PAIRS:
            i, j = np.triu_indices(len(group), 1)
            pairs.append(np.stack([group[i], group[j]], axis=1))
        else:
            pairs.append(np.stack([np.full(len(group) - 1, group[0]), group[1:]], axis=1))
            pairs.append(np.stack([group[:-1], group[1:]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=keys.dtype)
    return np.unique(np.concatenate(pairs), axis=0)


def clusters(edges: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Connected components of verified pairs: each member's cluster root, the smallest key of its cluster (the
    document kept), for members that are not roots themselves."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: r for i in parent if (r := root(i)) != i}


def near_duplicates(sketches: Sequence[Sketch], threshold: float, num_perm: int) -> dict[int, tuple[int, float]]:
    """Map each near-duplicate document's index to (index of the document kept for its cluster, their
    exact Jaccard similarity). Documents with no shingles are never near duplicates. In memory: the clean
    stage runs the same steps (band hashes, candidate pairs, exact verification, clusters) over shards."""
    bands, rows = lsh_shape(threshold, num_perm)
    indices = [i for i, s in enumerate(sketches) if len(s.shingles)]
    if not indices:
        return {}
    hashes = np.concatenate([band_hashes(sketches[i].minhash, bands, rows) for i in indices])
    keys = np.repeat(np.asarray(indices, dtype=np.int64), bands)
    edges = [
        (a, b)
        for a, b in candidate_pairs(hashes, keys).tolist()
        if jaccard(sketches[a].shingles, sketches[b].shingles) >= threshold
    ]
    return {
        i: (r, round(jaccard(sketches[i].shingles, sketches[r].shingles), 4))
        for i, r in sorted(clusters(edges).items())
    }
