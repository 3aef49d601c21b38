"""Install requirements.lock into this interpreter's environment, torch first, from wherever torch is.

    .venv/bin/python scripts/install_lock.py [requirements.lock] [--dry-run]      (what `make setup` runs)

The lock pins a CPU build, `torch==2.13.0+cpu`, which PyPI does not host. So torch goes first, alone and without
its dependencies (the lock pins those):
  1. kept if some build of that torch version is installed already (a CUDA build you installed yourself);
  2. else from the indexes and find-links pip is configured with (`pip config list`: a local wheel folder, a
     mirror of the PyTorch builds), the quick path on machines that have one;
  3. else from the PyTorch index of that build, https://download.pytorch.org/whl/cpu, for torch alone: the
     other packages never wait on that index.
On macOS, which has no `+cpu` builds, the plain `torch==2.13.0` (PyPI's is the CPU build there), the same way.
Then the rest of the lock, without its torch line, from pip's configured indexes.

--dry-run looks everything up the same way and installs nothing (pip's --dry-run; torch is looked up even when a
build of it is installed). Only the standard library here: this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PYTORCH_INDEX = "https://download.pytorch.org/whl/"  # + the build's label (cpu, cu128, ...): its own index
TORCH_LINE = re.compile(r"^torch==(?P<version>[^+\s]+)(?:\+(?P<build>\w+))?$")
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]


class SetupError(RuntimeError):
    """Torch cannot be installed; the message says what to do."""


def locked_torch(lines: list[str]) -> tuple[str, str | None]:
    """(version, build label) of the lock's torch pin: ("2.13.0", "cpu") for `torch==2.13.0+cpu`."""
    for line in lines:
        if m := TORCH_LINE.match(line.strip()):
            return m["version"], m["build"]
    raise SetupError("the lock has no torch==<version> line")


def torch_requirement(version: str, build: str | None, platform: str = sys.platform) -> str:
    """What to ask pip for: the locked build, or the plain version on macOS (no `+cpu` builds exist there)."""
    return f"torch=={version}+{build}" if build and platform != "darwin" else f"torch=={version}"


def pytorch_index(build: str | None) -> str:
    return PYTORCH_INDEX + (build or "cpu")


def keeps(installed: str | None, version: str) -> bool:
    """Whether the installed torch stays: any build of the locked version (2.13.0+cu128 for 2.13.0+cpu)."""
    return installed is not None and installed.split("+")[0] == version


def without_torch(lines: list[str]) -> list[str]:
    return [line for line in lines if not TORCH_LINE.match(line.strip())]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def shown(cmd: list[str]) -> str:
    return shlex.join(["pip", *cmd[3:]])


def install_torch(version: str, build: str | None, dry_run: bool) -> None:
    """Torch alone, without dependencies: kept, or from pip's configured indexes, or from the PyTorch index."""
    requirement = torch_requirement(version, build)
    installed = None if dry_run else installed_version("torch")
    if keeps(installed, version):
        print(f"torch {installed} is installed: kept")
        return
    dry = ["--dry-run", "--ignore-installed"] if dry_run else []
    configured = [*PIP_INSTALL, "--no-deps", *(dry or ["--quiet"]), requirement]  # a dry run says what it would do
    print(f"torch from pip's configured indexes: {shown(configured)}")
    if subprocess.run(configured).returncode == 0:
        return
    index = pytorch_index(build)
    # --index-url replaces the configured index for this one command; a configured no-index would make pip ignore
    # it, and the environment outranks pip's config files
    fallback = [*PIP_INSTALL, "--no-deps", *dry, "--index-url", index, requirement]  # not quiet: ~200 MB to fetch
    print(f"{requirement} is not on pip's configured indexes; the PyTorch index, for torch alone: {shown(fallback)}")
    if subprocess.run(fallback, env={**os.environ, "PIP_NO_INDEX": "0"}).returncode == 0:
        return
    raise SetupError(
        f"pip could not find {requirement} on your configured indexes (pip config list) nor on {index}: check your "
        f"network or proxy (pip's proxy and cert settings), or install torch {version} yourself (README: Setup "
        "details, GPU) and rerun make setup"
    )


def install_rest(lines: list[str], dry_run: bool) -> int:
    """The lock without its torch line, from pip's configured indexes (torch there already satisfies its users)."""
    rest = without_torch(lines)
    if not any(line.strip() and not line.lstrip().startswith("#") for line in rest):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp, "requirements-without-torch.txt")
        requirements.write_text("\n".join(rest) + "\n")
        cmd = [*PIP_INSTALL, "--dry-run" if dry_run else "--quiet", "-r", str(requirements)]
        print(f"the rest of the lock: {shown(cmd[:-1])} <the lock without torch>")
        return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # each line before the pip output that follows it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", nargs="?", type=Path, default=Path("requirements.lock"))
    parser.add_argument("--dry-run", action="store_true", help="look everything up, install nothing")
    args = parser.parse_args(argv)
    lines = args.lock.read_text().splitlines()
    try:
        install_torch(*locked_torch(lines), dry_run=args.dry_run)
    except SetupError as exc:
        print(f"make setup: {exc}", file=sys.stderr)
        return 1
    return install_rest(lines, args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
