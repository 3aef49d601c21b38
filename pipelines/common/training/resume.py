"""One checkpoint folder per configuration: <root>/<fingerprint>/, and what to do with the other folders.

A stage names everything that shapes the weights a run ends with (its model, tokenizer, data digests and the
params that are not hardware or cadence) in an identity dict; `digest` of it names the folder. Run again:

- the same configuration after an interruption: it resumes from its folder; after it finished: it re-exports the
  final checkpoint without training;
- another configuration: it starts fresh in its own folder. An interrupted run of another configuration is kept,
  and a log line says where and what differs (restore those params to resume it); a finished one is removed (its
  model was exported and it would never train again).

    >>> digest({"model_config": {...}, "tokenizer_sha256": "...", "train": {...}})
    '3f0c9a2e51d7b604'
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.common.training.checkpoints import CheckpointError, list_checkpoints, read_metadata


def digest(identity: dict) -> str:
    """16 hex digits naming a configuration (the JSON of `identity`, keys sorted)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """What differs between two nested dicts, in words: 'finetune.lr changed from 0.001 to 0.002'."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key} changed from {old} to {new}")
    return lines


@dataclass(frozen=True)
class StoredRun:
    """A configuration's folder, as its newest readable checkpoint describes it."""

    directory: Path
    step: int
    total_steps: int | None  # None: written before runs recorded it
    info: dict  # the checkpoint's quill run info

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps


def stored_runs(root: Path) -> list[StoredRun]:
    """Every configuration folder under `root` holding a readable checkpoint (headers only: cheap)."""
    found = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for step, path in list_checkpoints(directory):
            try:
                skeleton = read_metadata(path)
            except CheckpointError:
                continue  # torn: the previous one describes the run
            info = skeleton.get("quill") or {}
            found.append(StoredRun(directory, step, info.get("total_steps"), info))
            break
    return found


def settle_other_runs(root: Path, current_fingerprint: str, describe: Callable[[dict], list[str]]) -> list[str]:
    """Keep interrupted runs of other configurations, remove finished ones; the log lines saying what was done.
    `describe(info)` says how a stored run's info differs from the current run's."""
    lines = []
    for run in stored_runs(root):
        if run.directory.name == current_fingerprint:
            continue
        if run.finished:
            shutil.rmtree(run.directory, ignore_errors=True)
            lines.append(
                f"removed {run.directory}/: a finished run of another configuration (its model was "
                "exported), never resumed"
            )
            continue
        differs = "; ".join(describe(run.info)[:4])
        of = f" of {run.total_steps}" if run.total_steps else ""
        lines.append(
            f"kept {run.directory}/: an interrupted run (step {run.step}{of}) of another configuration"
            f"{f' ({differs})' if differs else ''}; it resumes when its params are restored, "
            "or delete the folder"
        )
    legacy = list_checkpoints(root)
    if legacy:
        lines.append(
            f"ignored {len(legacy)} checkpoint(s) directly in {root}/ (the layout before per-configuration "
            "folders); kept, delete them when no longer needed"
        )
    return lines
