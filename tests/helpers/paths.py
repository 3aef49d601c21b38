"""Where the repository and its virtual environment are, and how tests run quill's commands like a user does."""

from __future__ import annotations

import os
import random
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


# Where free_port looks: below the kernel's ephemeral range (32768-60999), where Ray's processes bind the ports they
# pick themselves and every outgoing connection takes its local port, and apart from Ray's worker ports
# (10002-19999) and its Serve replicas' ports in high-throughput mode (30000-31000). A port chosen here is not
# taken by one of them between the choice and its use.
TEST_PORTS = range(20000, 30000)
_ports = random.Random()  # its own generator: pytest-randomly reseeds the global one before each test
_handed_out: set[int] = set()  # two choices in a row never give one port twice, used or not


def free_port() -> int:
    """A TCP port nothing is bound to right now, on any address, from TEST_PORTS, never handed out before."""
    for port in _ports.sample(TEST_PORTS, 200):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port in {TEST_PORTS}")
