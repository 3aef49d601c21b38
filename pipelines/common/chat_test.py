"""The held-out chat test: which conversations of data/chat/test.jsonl are scored, and how a model's replies are
scored on them (bits per byte of the assistant's content). chat_eval measures the chat model and its base with it;
chat_register re-measures a champion scored by another version of it (RESPONSE_SCORER).

    >>> conversations = held_out_conversations(Path("data/chat/test.jsonl"), max_conversations=200)
    >>> score = response_score(engine.model, literal(engine.tokenizer), conversations, batch_size=16)
    >>> score.bpb, score.tokens, score.bytes

Which conversations: those with an assistant turn; when there are more than max_conversations, those whose SHA-256
(of the messages' canonical JSON, the identity chat_data gives them) read at bytes 16-23 is smallest: the same
conversations whatever order the file holds them in, and a larger cap only adds to them. chat_data picks the split
with bytes 0-7 and a source's cap with bytes 8-15, so this draw is independent of both. The file's order is kept.

Response bits per byte. Numerator: -log2 p of every token of the assistant messages' content, each given
everything before it in the conversation rendered in ChatML (model/chat.py: system and user turns, earlier replies,
the role headers). Not counted: the other roles' tokens, the role headers, and the <|im_end|> that closes a reply
(whether a model stops is the end-of-turn rate's business, pipelines/chat_eval/end_of_turn.py). Denominator: the
UTF-8 bytes of the assistant messages' content, so models with different tokenizers compare fairly.

A conversation whose last scored token lies within the model's context is one window. A longer one is scored a
reply at a time, each with its context truncated from the left: the window ends at the reply's last token and
keeps the most recent block_size tokens before it (a reply longer than that is cut into several such windows).
Windows are sorted by length and run batch_size at a time, right-padded (padding after the last real token never
changes what a causal model computes before it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from model import GPT
from model.chat import chat_markers, encode_chat
from pipelines.common.errors import StageError

# Bumped whenever response_score's numbers change for the same model and conversations (or the sample does): a
# champion scored by another version is scored again before it is compared (chat_register)
RESPONSE_SCORER = "response_bpb/1"

Messages = list[dict[str, str]]


class ChatTestError(StageError):
    """data/chat/test.jsonl is missing or holds no conversation to score; the message says what to do."""


def sample_key(messages: Messages) -> int:
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[16:24], "big")


def held_out_conversations(path: Path, max_conversations: int) -> list[Messages]:
    """The conversations of `path` that have an assistant turn, at most max_conversations (a stable-hash sample)."""
    if not path.is_file():
        raise ChatTestError(f"{path} not found: run the chat_data stage first (dvc repro chat_data)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line)["messages"] for line in f if line.strip()]
    rows = [m for m in rows if any(message["role"] == "assistant" for message in m)]
    if not rows:
        raise ChatTestError(
            f"{path} holds no conversation with an assistant turn: check finetune.split.test and finetune.sources, "
            "then run dvc repro chat_data"
        )
    if len(rows) <= max_conversations:
        return rows
    keep = set(sorted(range(len(rows)), key=lambda i: (sample_key(rows[i]), i))[:max_conversations])
    return [rows[i] for i in sorted(keep)]


# --- response bits per byte ------------------------------------------------------------------------

IGNORE = -100  # a position whose next token is not scored


@dataclass(frozen=True)
class Window:
    inputs: list[int]  # token ids fed to the model
    targets: list[int]  # per input position, the next token when it is scored, else IGNORE


@dataclass(frozen=True)
class ResponseScore:
    nats: float  # -sum of ln p over the scored tokens
    tokens: int  # scored tokens: the assistant messages' content
    bytes: int  # UTF-8 bytes of the assistant messages' content

    @property
    def bpb(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)


def scored_turns(ids: Sequence[int], assistant: Sequence[bool], im_end: int) -> list[list[int]]:
    """The positions in `ids` of each assistant reply's content tokens (encode_chat's mask without <|im_end|>)."""
    turns: list[list[int]] = []
    inside = False
    for p, (t, mine) in enumerate(zip(ids, assistant)):
        if mine and t != im_end:
            if not inside:
                turns.append([])
            turns[-1].append(p)
        inside = mine and t != im_end
    return turns


def cover(ids: Sequence[int], positions: list[int], block_size: int) -> list[Window]:
    """Windows that score every position in `positions` (sorted), each ending at the latest one it scores and
    holding the block_size tokens before it (fewer at the conversation's start)."""
    windows, todo = [], list(positions)
    while todo:
        end = todo[-1]  # the window's inputs predict ids[start + 1 .. end]
        start = max(0, end - block_size)
        mine = [p for p in todo if p > start]
        targets = [IGNORE] * (end - start)
        for p in mine:
            targets[p - 1 - start] = ids[p]
        windows.append(Window(list(ids[start:end]), targets))
        todo = todo[: len(todo) - len(mine)]
    return windows


def conversation_windows(tokenizer: Tokenizer, messages: Sequence[dict], block_size: int) -> list[Window]:
    """The windows that score one conversation's replies (tokenizer: model.chat.literal's copy)."""
    _, im_end = chat_markers(tokenizer)
    e = encode_chat(tokenizer, messages, add_generation_prompt=False)
    turns = [t for t in scored_turns(e.ids, e.assistant, im_end) if t]
    if not turns:
        return []
    if turns[-1][-1] <= block_size:  # the whole conversation up to its last scored token fits: one window
        return cover(e.ids, [p for t in turns for p in t], block_size)
    return [w for t in turns for w in cover(e.ids, t, block_size)]


@torch.inference_mode()
def window_nats(
    model: GPT, windows: Sequence[Window], batch_size: int, progress: Callable[[int, int], None] | None = None
) -> float:
    """-sum of ln p(target) over every window's scored positions; batched, longest windows first."""
    device = next(model.parameters()).device
    order = sorted(windows, key=lambda w: -len(w.inputs))
    total = 0.0
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        T = max(len(w.inputs) for w in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
        for r, w in enumerate(chunk):
            idx[r, : len(w.inputs)] = torch.tensor(w.inputs)
            tgt[r, : len(w.targets)] = torch.tensor(w.targets)
        hidden = model.hidden_states(idx.to(device))
        tgt = tgt.to(device)
        scored = tgt != IGNORE
        # the output head only where a reply's token is predicted
        total += F.cross_entropy(model.logits(hidden[scored]), tgt[scored], reduction="sum").item()
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    return total


def response_score(
    model: GPT,
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> ResponseScore:
    """The assistant replies' nats, tokens and bytes over every conversation (tokenizer: model.chat.literal's)."""
    windows = [w for m in conversations for w in conversation_windows(tokenizer, m, model.config.block_size)]
    tokens = sum(t != IGNORE for w in windows for t in w.targets)
    n_bytes = sum(len(m["content"].encode("utf-8")) for c in conversations for m in c if m["role"] == "assistant")
    return ResponseScore(window_nats(model, windows, batch_size, progress), tokens, n_bytes)
