"""`make setup` finds torch wherever it is (scripts/install_lock.py): the indexes pip is configured with first, then
the PyTorch index of the locked build for torch alone, and an error that says what to do when neither has it.

pip runs for real, in --dry-run mode (nothing is installed) and with this machine's pip configuration replaced: an
empty or a one-wheel find-links folder, no index, and a proxy that records where pip wants to go and refuses it,
so nothing leaves the machine and every lookup fails at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from scripts.install_lock import keeps, pytorch_index, torch_requirement, without_torch
from tests.helpers.paths import REPO, free_port

SCRIPT = REPO / "scripts" / "install_lock.py"
LOCK = ["# a lock", "numpy==2.4.6", "torch==2.13.0+cpu", "torchmetrics==1.9.0"]


@pytest.fixture
def proxy():
    """(URL, requests seen): an HTTP proxy that writes down each request's first line and then hangs up."""
    seen: list[str] = []
    server = socket.create_server(("127.0.0.1", free_port()))
    server.settimeout(0.1)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                seen.append(conn.recv(4096).split(b"\r\n", 1)[0].decode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    done.set()
    thread.join()
    server.close()


def fake_torch_wheel(folder: Path, version: str) -> Path:
    """A wheel named like torch's with nothing in it: enough for pip to find and resolve it."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def install(tmp_path: Path, proxy_url: str, find_links: Path, lock: list[str]) -> subprocess.CompletedProcess:
    """The script in --dry-run mode, pip configured with `find_links` only: no config files, no index."""
    (tmp_path / "requirements.lock").write_text("\n".join(lock) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
        "PIP_CONFIG_FILE": os.devnull,  # none of this machine's pip.conf files (its wheel folder holds torch)
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(find_links),
        "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple",  # nothing listens there
        "PIP_PROXY": proxy_url,
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "5",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", str(tmp_path / "requirements.lock")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_torch_on_no_configured_index_is_looked_for_on_the_pytorch_index_alone_and_the_error_says_what_to_do(
    tmp_path, proxy
):
    proxy_url, seen = proxy
    result = install(tmp_path, proxy_url, tmp_path / "empty", LOCK)
    assert result.returncode == 1, result.stdout + result.stderr
    requirement = torch_requirement("2.13.0", "cpu")
    lines = result.stdout.splitlines()
    first = next(line for line in lines if line.startswith("torch from pip's configured indexes: "))
    assert first.endswith(f"--no-deps --dry-run --ignore-installed {requirement}") and "--index-url" not in first
    fallback = next(line for line in lines if "the PyTorch index, for torch alone: " in line)
    # torch alone, without its dependencies, from that index only
    assert fallback.endswith(f"--no-deps --dry-run --ignore-installed --index-url {pytorch_index('cpu')} {requirement}")
    assert pytorch_index("cpu") == "https://download.pytorch.org/whl/cpu"
    assert f"Looking in indexes: {pytorch_index('cpu')}" in result.stdout  # pip itself ran with it, despite no-index
    assert [s.split()[:2] for s in seen] == [["CONNECT", "download.pytorch.org:443"]], seen  # all pip asked for
    assert result.stderr.rstrip().endswith(
        f"make setup: pip could not find {requirement} on your configured indexes (pip config list) nor on "
        f"{pytorch_index('cpu')}: check your network or proxy (pip's proxy and cert settings), or install torch "
        "2.13.0 yourself (README: Setup details, GPU) and rerun make setup"
    )
    assert "the rest of the lock" not in result.stdout  # nothing else was tried without torch


def test_torch_from_a_configured_wheel_folder_never_asks_the_pytorch_index(tmp_path, proxy):
    proxy_url, seen = proxy
    version = torch_requirement("2.13.0", "cpu").removeprefix("torch==")
    wheels = tmp_path / "wheels"
    fake_torch_wheel(wheels, version)
    result = install(tmp_path, proxy_url, wheels, ["torch==2.13.0+cpu"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Would install torch-{version}" in result.stdout
    assert "PyTorch index" not in result.stdout and seen == []


@pytest.mark.parametrize(
    ("platform", "expected"),
    [("linux", "torch==2.13.0+cpu"), ("darwin", "torch==2.13.0"), ("win32", "torch==2.13.0+cpu")],
)
def test_macos_asks_for_the_plain_build(platform, expected):
    assert torch_requirement("2.13.0", "cpu", platform) == expected
    assert torch_requirement("2.13.0", None, platform) == "torch==2.13.0"


@pytest.mark.parametrize(
    ("installed", "kept"),
    [("2.13.0+cpu", True), ("2.13.0+cu128", True), ("2.13.0", True), ("2.12.0+cpu", False), (None, False)],
)
def test_any_installed_build_of_the_locked_version_is_kept(installed, kept):
    assert keeps(installed, "2.13.0") is kept


def test_the_rest_of_the_lock_is_everything_but_torch():
    assert without_torch(LOCK) == ["# a lock", "numpy==2.4.6", "torchmetrics==1.9.0"]
