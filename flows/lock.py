"""One pipeline run per workspace: an exclusive lock on .quill/workspace.lock for the whole flow run.

The kernel drops the lock when its process ends, however it ends, so a killed run never leaves it held.
A second run is refused at once, with the holder's flow run and pid (deployments also queue their runs with
a Prefect concurrency limit of 1, so runs started from the UI wait instead: flows/deploy.py).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = Path(".quill") / "workspace.lock"


class WorkspaceBusy(RuntimeError):
    """Another flow run holds this workspace."""


@contextmanager
def workspace_lock(holder: str, path: Path = LOCK_FILE) -> Iterator[None]:
    """Hold the workspace for `holder` (a flow run's name and id), or raise WorkspaceBusy naming who has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = path.read_text(encoding="utf-8").strip() or "unknown"
            raise WorkspaceBusy(
                f"another pipeline run holds this workspace ({who}); wait for it to finish, "
                f"or cancel it in the Prefect UI"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"holder": holder, "pid": os.getpid()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock
