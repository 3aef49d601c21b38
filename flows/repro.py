"""`dvc repro <stage>` as a subprocess: its output goes to the task's log, its progress to a callback.

DVC decides whether a stage runs (its deps, params and outs against dvc.lock); this module only starts it
and reads what happened from its output, so a flow never re-declares what dvc.yaml owns.

The log keeps what tells the story: DVC's "Running stage" / "didn't change, skipping" for the stage and the
stage's own lines. Left out are DVC's "didn't change" for each stage upstream of it, what DVC says after every
stage for a person at a terminal (`git add` and `dvc push` hints, lock file updates) and progress bars that
other libraries draw (tqdm and Lightning redraws, one line each once written to a pipe). The stage's progress
lines (pipelines/common/progress.py: a line per 10 %) are logged and passed to the callback as (what, percent).
"""

from __future__ import annotations

import contextlib
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

import psutil

from pipelines.common.progress import LINE

# a tqdm redraw: "train:  40%|████  | 4/10 [00:07<00:09, 1.2it/s]", "Generating split: 4 examples [00:00, 67/s]"
TQDM = re.compile(r" \[(\d+:)?\d+:\d\d[<,]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, and tqdm's cursor moves between nested bars
# DVC's notes for a person at a terminal, printed after every stage that changed files
DVC_NOTES = re.compile(
    r"^(To track the changes with git, run:|To enable auto staging, run:|git add |dvc config core\.autostage"
    r"|Use `dvc push` to send your updates|(Generating|Updating) lock file )"
)
UNCHANGED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping$")


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


def shown(line: str, stage: str) -> bool:
    """Whether a line of `dvc repro <stage>`'s output (ANSI codes removed, stripped) belongs in the task's log."""
    unchanged = UNCHANGED.match(line)
    if unchanged:
        return unchanged["stage"] == stage  # each stage upstream says so too: its own task said it already
    return bool(line) and not TQDM.search(line) and not DVC_NOTES.match(line)


def repro(stage: str, log: Callable[[str], None], progress: Callable[[str, float], None] | None = None) -> Repro:
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
    try:
        while chunk := proc.stdout.read(4096):
            pending += chunk
            *parts, pending = re.split(rb"[\r\n]", pending)
            for raw in parts:
                line = ANSI.sub("", raw.decode("utf-8", "replace")).strip()
                if not shown(line, stage):
                    continue
                match = LINE.match(line)
                if match and progress is not None:
                    speed = f" ({match['count']}; {match['rate']}, ETA {match['eta']})" if match["eta"] else ""
                    progress(match["desc"] + speed, float(match["percent"]))
                if line.startswith(f"Running stage '{stage}'"):
                    ran = True
                tail.append(line)
                log(line)
    except BaseException:
        stop(proc)  # a retry of the task must not find this run's stage still going, holding DVC's locks
        raise
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


def stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """End `dvc repro` and the stage it runs: SIGTERM first to the stage (a training stage saves a checkpoint and
    exits), then to DVC; what is left after `grace` seconds is killed."""
    try:
        stages = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        stages = []
    for p in stages:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(stages, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
