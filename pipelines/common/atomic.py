"""Write outputs so that an interrupted stage never leaves half a file that DVC would take as valid.

What `atomic_file` and `atomic_dir` guarantee (POSIX, one filesystem):
- Readers see the old output or the whole new one, never a mix: everything is written to a temporary
  sibling (`.<name>.<pid>.<random>.tmp`), flushed to disk (files and folders are fsynced), and renamed
  into place; the parent folder is fsynced after the rename, so the rename itself survives a power cut.
- On an exception the temporary sibling is removed and the old output is left as it was.
- After a SIGKILL or power cut the temporary sibling stays behind; the next `atomic_*` call on the same
  path (or `scratch_dir` on the same prefix) removes siblings whose process is gone. `atomic_dir` swaps a
  folder in two renames (old aside to `.<name>.old`, new in); a crash between them leaves `<name>` missing
  and `.<name>.old` whole, and the next call puts `.<name>.old` back before it starts.
- Outputs get the usual permissions (0666/0777 minus the umask), not mkstemp/mkdtemp's 0600/0700.
Not guaranteed: two processes writing the same output at once (DVC's repository lock prevents that).

`scratch_dir` is a private working folder (0700) for a stage, removed on exit and after a crash.
Writing errors that mean the disk or a limit is full (`is_out_of_space`) must stop a stage, never be
taken for an unreadable input: `OutOfSpaceError` is the stage error for them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipelines.common.errors import StageError

_UMASK = os.umask(0)
os.umask(_UMASK)
OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_SCRATCH_NAME = re.compile(r"(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}")  # "<pid>.<mkdtemp's 8 random characters>"


class OutOfSpaceError(StageError):
    """Writing an output failed because the disk, a quota or the file-size limit is full."""


def is_out_of_space(exc: BaseException) -> bool:
    """True for an OSError that says the disk, a quota or the file-size limit (ulimit -f) is full."""
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE


@contextlib.contextmanager
def out_of_space_stops_stage() -> Iterator[None]:
    """Turn ENOSPC/EFBIG/EDQUOT raised inside into one OutOfSpaceError (a one-line stage failure)."""
    try:
        yield
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutOfSpaceError(
            f"cannot write output{where}: {exc.strerror or exc} [{errno.errorcode[exc.errno]}]; "
            "free disk space or raise the file-size limit, then run again"
        ) from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove `<prefix><pid>.<random><suffix>` entries of `parent` whose process is gone (left by a crash),
    and entries of the form `<prefix><random><suffix>` without a pid (written before pids were recorded)."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        match = _SCRATCH_NAME.fullmatch(name[len(prefix) : len(name) - len(suffix)])
        if match is None:
            continue  # another output's temporary (".train.jsonl.<pid>..." beside ".train.<pid>...")
        if match["pid"] and (int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder below root (and root), so a rename publishes data that is on disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.", ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        _fsync_path(Path(tmp))
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)  # a crash between the two renames below: the previous output comes back
    shutil.rmtree(old, ignore_errors=True)
    remove_stale(path.parent, f".{path.name}.", ".tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs get the usual permissions
        _fsync_tree(tmp)
        if path.exists():
            os.replace(path, old)
            os.replace(tmp, path)
            _fsync_path(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A private working folder `<parent>/<prefix><pid>.<random>`, removed on exit; ones left by a
    killed run (their pid is gone) are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: object) -> None:
    """Write `obj` as pretty, key-sorted JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
