"""Reading a clean split (data/clean/<split>.jsonl, written by the clean stage): one JSON object per line
with a "text" field. Tokenize streams it; evaluate and register read whole splits.

    >>> for text in iter_texts(Path("data/clean/train.jsonl")): ...
    >>> read_texts(Path("data/clean/test.jsonl"))
    ['First document ...', ...]
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pipelines.common.errors import StageError


class CleanSplitError(StageError):
    """A line of a clean split is not a clean record: the split was edited or written by something else."""


def iter_texts(path: Path) -> Iterator[str]:
    """The "text" field of each line, in order (blank lines skipped); CleanSplitError names file:line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise CleanSplitError(
                    f"{path}:{line_no} is not a clean record with a 'text' field; rerun the clean stage "
                    "(dvc repro clean)."
                )
            yield text


def read_texts(path: Path) -> list[str]:
    """Every document of one clean split, in order."""
    return list(iter_texts(path))
