"""Which split a record goes to: a pure function of the record's own SHA-256, so the same record always lands in
the same split, whatever else the corpus holds (adding records never moves another one).

    >>> split_of(hashlib.sha256(b"some passage").digest(), val=0.05, test=0.05)
    'train'
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")


def split_of(digest: bytes, val: float, test: float) -> str:
    """The split of a record, from the first 8 bytes of its SHA-256 read as a fraction of 2**64."""
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val else "test" if u < val + test else "train"
