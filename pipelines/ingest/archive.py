"""Unpack the wanted files of a source archive (.tar.*, .zip), with bounds on what a hostile one can cost.

Only members whose path below the archive's top folder matches `include` are written, each through
tarfile's `data` filter (no absolute paths, no `..`, no links out, no devices). Before a member's data is
read (tar) or anything is written (zip), the running member count and sum of declared sizes are checked:
past MAX_MEMBERS or MAX_TOTAL_BYTES the archive is refused, so a decompression bomb costs at most that.
A wanted member larger than `max_file_bytes` is skipped and reported. A corrupt archive is an IngestError
that names it.
"""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pipelines.common.atomic import is_out_of_space
from pipelines.ingest.errors import IngestError

MAX_MEMBERS = 100_000  # members in one archive (a real sdist holds hundreds)
MAX_TOTAL_BYTES = 4 * 2**30  # declared unpacked bytes of all members together

Matcher = Callable[[str], bool]


def _relative(name: str) -> str | None:
    """A member's path below the top folder (`pkg-1.0/a/b.txt` -> `a/b.txt`); None for the top itself."""
    parts = PurePosixPath(name).parts
    return "/".join(parts[1:]) if len(parts) > 1 else None


def _check_safe(archive: Path, name: str) -> None:
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise IngestError(f"{archive.name} holds an unsafe path: {name}")


class _Budget:
    def __init__(self, archive: Path) -> None:
        self.archive, self.members, self.bytes = archive, 0, 0

    def take(self, name: str, size: int) -> None:
        self.members += 1
        self.bytes += max(size, 0)
        if self.members > MAX_MEMBERS:
            raise IngestError(f"{self.archive.name}: more than {MAX_MEMBERS} members; refusing a hostile archive")
        if self.bytes > MAX_TOTAL_BYTES:
            raise IngestError(
                f"{self.archive.name}: members add up to more than {MAX_TOTAL_BYTES} bytes unpacked "
                f"(at {name}); refusing a decompression bomb"
            )


def extract(archive: Path, into: Path, wanted: Matcher, max_file_bytes: int) -> tuple[list[str], list[dict]]:
    """Unpack the wanted members into `into` (top folder stripped); (relative paths written, skipped entries)."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.endswith(".zip"):
            return _extract_zip(archive, into, wanted, max_file_bytes)
        return _extract_tar(archive, into, wanted, max_file_bytes)
    except IngestError:
        raise
    except tarfile.FilterError as exc:
        raise IngestError(f"{archive.name} holds an unsafe member: {exc}") from None
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        OSError,
        ValueError,
        UnicodeError,
    ) as exc:
        if is_out_of_space(exc):
            raise
        raise IngestError(f"{archive.name} is corrupt or not a valid archive: {type(exc).__name__}: {exc}") from None


def _too_large(rel: str, size: int, max_file_bytes: int) -> dict:
    return {"rel": rel, "reason": f"too_large: {size} bytes unpacked > data.max_file_bytes={max_file_bytes}"}


def _extract_tar(archive: Path, into: Path, wanted: Matcher, max_file_bytes: int) -> tuple[list[str], list[dict]]:
    written, skipped, budget = [], [], _Budget(archive)
    with tarfile.open(archive, "r:*") as tf:
        while (member := tf.next()) is not None:  # checked before the next member's data is decompressed
            budget.take(member.name, member.size)
            rel = _relative(member.name)
            if rel is None or member.isdir() or not wanted(rel):
                continue
            if not member.isfile():
                skipped.append({"rel": rel, "reason": "not a regular file (a link or device in the archive)"})
                continue
            if member.size > max_file_bytes:
                skipped.append(_too_large(rel, member.size, max_file_bytes))
                continue
            tarfile.data_filter(member, str(into))  # raises FilterError for absolute paths, links out, devices
            _check_safe(archive, member.name)
            data = tf.extractfile(member)
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                while block := data.read(1 << 20):
                    out.write(block)
            written.append(rel)
    return written, skipped


def _extract_zip(archive: Path, into: Path, wanted: Matcher, max_file_bytes: int) -> tuple[list[str], list[dict]]:
    written, skipped, budget = [], [], _Budget(archive)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # the whole central directory first: nothing is written from a refused archive
            budget.take(info.filename, info.file_size)
            _check_safe(archive, info.filename)
        for info in infos:
            rel = _relative(info.filename)
            if rel is None or info.is_dir() or not wanted(rel):
                continue
            if info.file_size > max_file_bytes:
                skipped.append(_too_large(rel, info.file_size, max_file_bytes))
                continue
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as data, open(target, "wb") as out:  # zipfile stops at the declared size
                while block := data.read(1 << 20):
                    out.write(block)
            written.append(rel)
    return written, skipped
