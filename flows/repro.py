"""`dvc repro <stage>` as a subprocess: its output goes to the task's log, progress bars to a callback.

DVC decides whether a stage runs (its deps, params and outs against dvc.lock); this module only starts it
and reads what happened from its output, so a flow never re-declares what dvc.yaml owns.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# tqdm's line from the train stage's StepProgressBar: "train:  40%|████      | 4/10 [00:07<...]"
PROGRESS = re.compile(r"^train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass(frozen=True)
class Repro:
    stage: str
    ran: bool  # False: DVC found it up to date and skipped it
    seconds: float


class StageFailed(RuntimeError):
    """`dvc repro <stage>` exited non-zero; the message ends with the last lines it printed."""


def dvc_bin() -> str:
    """The `dvc` beside this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def repro(stage: str, log: Callable[[str], None], progress: Callable[[int, int], None] | None = None) -> Repro:
    """Run `dvc repro <stage>` in the current directory; raise StageFailed with its output's tail on failure."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    ran = False
    proc = subprocess.Popen(
        [dvc_bin(), "repro", stage], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0
    )
    assert proc.stdout is not None
    pending = b""
    while chunk := proc.stdout.read(4096):
        pending += chunk
        *parts, pending = re.split(rb"[\r\n]", pending)
        for raw in parts:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            match = PROGRESS.match(line)
            if match:
                if progress is not None:
                    progress(int(match.group(1)), int(match.group(2)))
                continue
            if line.startswith(f"Running stage '{stage}'"):
                ran = True
            tail.append(line)
            log(line)
    code = proc.wait()
    if code != 0:
        lines = "\n".join(tail)
        raise StageFailed(f"dvc repro {stage} failed (exit {code}):\n{lines}")
    return Repro(stage, ran, time.monotonic() - start)


def stale(stage: str) -> bool:
    """Whether `dvc repro <stage>` would run something (`dvc status <stage>` lists changes)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([dvc_bin(), "status", stage, "--json"], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise StageFailed(f"dvc status {stage} failed: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}") != {}
