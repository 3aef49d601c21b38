"""Reference models for the eval report: what a transformer adds over counting.

    >>> lm = ByteNgram.fit([b"to be or not to be"], order=3)
    >>> lm.bits_per_byte([b"to be"])

- `uniform_bpb`: a model that gives every token id the same probability (loss = ln V).
- `ByteNgram`: an interpolated absolute-discounting byte n-gram model (discount 0.75, down to a uniform
  byte distribution), fitted on the train split with numpy (no Python loop over the corpus). Bytes, so its
  bits per byte compare with the transformer's whatever the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DISCOUNT = 0.75  # absolute discount per seen n-gram (Kneser & Ney's usual value)


def uniform_bpb(n_tokens: int, n_bytes: int, vocab_size: int) -> float:
    """Bits per byte of the uniform distribution over the vocabulary."""
    return n_tokens * math.log2(vocab_size) / max(n_bytes, 1)


def _keys(data: np.ndarray, k: int) -> np.ndarray:
    """The k-byte window ending at each position i >= k-1, packed big-endian into an int64."""
    key = np.zeros(len(data) - k + 1, dtype=np.int64)
    for j in range(k):
        key = (key << 8) | data[j : len(data) - k + 1 + j].astype(np.int64)
    return key


@dataclass
class _Order:
    grams: np.ndarray  # sorted unique k-gram keys
    gram_counts: np.ndarray
    contexts: np.ndarray  # sorted unique (k-1)-byte context keys
    context_counts: np.ndarray  # occurrences of each context (followed by any byte)
    context_types: np.ndarray  # distinct bytes seen after each context


def _lookup(table: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """counts[j] where table[j] == value, else 0 (table sorted)."""
    if len(table) == 0:
        return np.zeros(len(values), dtype=np.int64)
    j = np.searchsorted(table, values).clip(max=len(table) - 1)
    return np.where(table[j] == values, counts[j], 0)


class ByteNgram:
    def __init__(self, order: int, orders: list[_Order]):
        self.order, self.orders = order, orders

    @classmethod
    def fit(cls, docs: Sequence[bytes], order: int = 5) -> ByteNgram:
        if not 1 <= order <= 7:
            raise ValueError(f"order must be in [1, 7] (keys are packed into 64 bits), got {order}")
        data = np.frombuffer(b"\n".join(docs), dtype=np.uint8)
        orders = []
        for k in range(1, order + 1):
            if len(data) < k:
                break
            grams, counts = np.unique(_keys(data, k), return_counts=True)
            contexts, first = np.unique(grams >> 8, return_index=True)
            orders.append(
                _Order(grams, counts, contexts, np.add.reduceat(counts, first), np.diff(np.append(first, len(grams))))
            )
        return cls(order, orders)

    def log2_probs(self, doc: bytes) -> np.ndarray:
        """log2 p(byte_i | up to order-1 preceding bytes of the same document), for every byte."""
        data = np.frombuffer(doc, dtype=np.uint8)
        n = len(data)
        p = np.full(n, 1.0 / 256)
        for k, o in enumerate(self.orders, start=1):
            if n < k:
                break
            grams = _keys(data, k)  # for positions k-1 .. n-1
            c_hw = _lookup(o.grams, grams, o.gram_counts)
            c_h = _lookup(o.contexts, grams >> 8, o.context_counts)
            t_h = _lookup(o.contexts, grams >> 8, o.context_types)
            lower = p[k - 1 :]
            seen = c_h > 0
            safe = np.where(seen, c_h, 1)
            mixed = (np.maximum(c_hw - DISCOUNT, 0) + DISCOUNT * t_h * lower) / safe
            p[k - 1 :] = np.where(seen, mixed, lower)
        return np.log2(p)

    def bits_per_byte(self, docs: Sequence[bytes]) -> float:
        total_bits = sum(-float(self.log2_probs(d).sum()) for d in docs)
        return total_bits / max(sum(len(d) for d in docs), 1)
