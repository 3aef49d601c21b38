"""Near-duplicate detection for the clean stage: word shingles, MinHash LSH, exact verification.

A document becomes a set of 32-bit hashes of its lower-cased word k-shingles (`shingle_words`),
summarised by a `datasketch` MinHash. MinHashLSH proposes candidate pairs; each candidate is checked
with the exact Jaccard similarity of the two shingle sets, so a false candidate costs time, never a
wrong answer. Verified pairs are joined into clusters (connected components) and the first document
of each cluster, in the caller's order, is kept:

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

import numpy as np
from datasketch import MinHash, MinHashLSH

SEED = 1  # MinHash permutations; fixed so that results are reproducible
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative): candidates are verified, so favour recall
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BATCH = 1 << 15  # shingles per MinHash update: bounds the (batch, num_perm) temporary


@dataclass
class Sketch:
    shingles: np.ndarray  # sorted unique uint32 shingle hashes
    minhash: MinHash


def _word_hashes(text: str) -> np.ndarray:
    words = _WORD.findall(text.lower())
    table = {w: zlib.crc32(w.encode("utf-8")) for w in set(words)}
    return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))


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
                self._parts = [np.unique(np.concatenate(self._parts))]
                self._size = len(self._parts[0])
        self._tail = words[len(words) - (self.k - 1) :] if self.k > 1 else words[:0]

    def finish(self) -> np.ndarray:
        if not self._parts and self._words_seen:  # fewer words than k: one shingle of them all
            self._parts.append(_shingle_hashes(self._tail, self.k))
        return np.unique(np.concatenate(self._parts)) if self._parts else np.empty(0, dtype=np.uint32)


def minhash(shingles: np.ndarray, num_perm: int) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=SEED, hashfunc=int)  # shingles are already 32-bit hashes
    for start in range(0, len(shingles), _BATCH):
        m.update_batch(shingles[start : start + _BATCH].tolist())
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


def near_duplicates(sketches: Sequence[Sketch], threshold: float, num_perm: int) -> dict[int, tuple[int, float]]:
    """Map each near-duplicate document's index to (index of the document kept for its cluster, their
    exact Jaccard similarity). Documents with no shingles are never near duplicates."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    for i, s in enumerate(sketches):
        if len(s.shingles):
            lsh.insert(i, s.minhash, check_duplication=False)
    parent = list(range(len(sketches)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, s in enumerate(sketches):
        if not len(s.shingles):
            continue
        for j in lsh.query(s.minhash):
            if j > i and root(i) != root(j) and jaccard(s.shingles, sketches[j].shingles) >= threshold:
                ri, rj = root(i), root(j)
                parent[max(ri, rj)] = min(ri, rj)  # the cluster's root is its first document
    result = {}
    for i in range(len(sketches)):
        r = root(i)
        if r != i:
            result[i] = (r, round(jaccard(sketches[i].shingles, sketches[r].shingles), 4))
    return result
