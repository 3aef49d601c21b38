"""The one way pipelines hash files: a streaming sha256 of one file, and a content hash of a file or folder.

    >>> sha256_file("data/tokenizer/tokenizer.json")      # hex digest, what meta.json and config.json record
    'e3b0c442...'
    >>> content_hash("data/clean")                        # "sha256:..." over relative paths and contents
    'sha256:9f86d081...'

(`model/` keeps its own `model.hf.file_sha256`, the same digest, because the model package imports nothing of
pipelines.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def _update(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """ "sha256:<hex>" over a file, or over a folder's relative paths and file contents (sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        _update(h, f)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()
