"""One conversation as the chat data holds it, and how each kind of input becomes one.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`, each content
stripped of surrounding whitespace and non-empty, with at least one assistant message. An input that cannot become
one raises `BadRow`, whose reason is a key of REASONS (and of metrics/chat.json's `dropped`):

    >>> from_row({"prompt": "Hi?", "completion": " Hello. "})
    [{'role': 'user', 'content': 'Hi?'}, {'role': 'assistant', 'content': 'Hello.'}]
    >>> dialogue(["Who's there?", "Nay, answer me.", "Long live the king!"])  # the unanswered last turn goes
    [{'role': 'user', 'content': "Who's there?"}, {'role': 'assistant', 'content': 'Nay, answer me.'}]
    >>> from_row({"messages": [{"role": "bot", "content": "x"}]})
    Traceback (most recent call last):
    BadRow: unknown_role: message 1 has role 'bot' (allowed: system, user, assistant)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator

ROLES = ("system", "user", "assistant")
REASONS = {  # why an input row is not kept, as the report explains it
    "not_json": "the line or file is not JSON (or not UTF-8)",
    "malformed": "no `messages` list of {role, content} objects and no `prompt`/`completion` strings",
    "unknown_role": "a role other than system, user and assistant",
    "empty_content": "a message with empty content",
    "no_assistant_turn": "no assistant message (a dialogue of a single turn, a prompt without completion)",
    "duplicate": "the same messages as a conversation before it (kept once)",
}

Messages = list[dict[str, str]]


class BadRow(Exception):
    """This input is not a usable conversation; `reason` is a key of REASONS, `detail` says where and what."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def attempt(make: Callable[..., Messages], *args) -> Messages | BadRow:
    """The conversation `make(*args)` builds, or the BadRow it raises (a reader yields either)."""
    try:
        return make(*args)
    except BadRow as bad:
        return bad


def checked(messages: object) -> Messages:
    """The messages, normalised (contents stripped, other keys dropped), or BadRow saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("malformed", "`messages` is not a non-empty list")
    out: Messages = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRow("malformed", f"message {number} is not a {{role, content}} object")
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise BadRow("unknown_role", f"message {number} has role {role!r} (allowed: {', '.join(ROLES)})")
        if content is not None and not isinstance(content, str):
            raise BadRow("malformed", f"message {number}'s content is a {type(content).__name__}, not a string")
        if not content or not content.strip():
            raise BadRow("empty_content", f"message {number} ({role}) has empty content")
        out.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no_assistant_turn", f"{len(out)} message(s), none from the assistant")
    return out


def from_row(row: object, messages_field: str = "messages") -> Messages:
    """A JSON row: {messages_field: [{role, content}, ...]} or {"prompt", "completion"} (user, then assistant)."""
    if not isinstance(row, dict):
        raise BadRow("malformed", f"a JSON {type(row).__name__}, not an object")
    if messages_field in row:
        return checked(row[messages_field])
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and completion is None:
        raise BadRow("no_assistant_turn", "a prompt without a completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise BadRow("malformed", f"no `{messages_field}` list and no `prompt`/`completion` strings")
    return checked([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])


def from_json_line(line: bytes) -> Messages:
    """One line of a JSONL file (UTF-8), as from_row reads it."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRow("not_json", str(exc)) from None
    return from_row(row)


def dialogue(turns: object) -> Messages:
    """Turns of two speakers taking turns: the first speaker is the user, the second the assistant. A last turn that
    nobody answers is left out; a single turn is no conversation (no_assistant_turn)."""
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise BadRow("malformed", "a dialogue is a list of strings")
    turns = turns[: len(turns) // 2 * 2]
    if not turns:
        raise BadRow("no_assistant_turn", "a single turn, which nobody answers")
    return checked([{"role": ROLES[1 + i % 2], "content": text} for i, text in enumerate(turns)])


def digest(messages: Messages) -> bytes:
    """SHA-256 of a conversation's canonical JSON: its identity for deduplication, sampling and the split."""
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def jsonl_rows(lines: Iterable[bytes], name: str) -> Iterator[tuple[str, Messages | BadRow]]:
    """(name#L<line>, conversation or BadRow) for each non-blank line of a JSONL file."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield f"{name}#L{number}", attempt(from_json_line, line)
