"""Where the repository and its virtual environment are, and how tests run quill's commands like a user does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def run_module(
    module: str, cwd: Path, *args: str, check: bool = False, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m <module>` from `cwd` the way a user or DVC does (with the repo importable)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    """A TCP port nothing listens on right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
