"""Conversations -> training windows: ChatML ids, the loss targets (the assistant's tokens only), padded batches.

A conversation is encoded by model.chat.encode_chat on the base's own tokenizer (`literal`: content never forges a
marker) and cut into its messages at each <|im_start|>. Each message is `<|im_start|>role\\ncontent<|im_end|>\\n`; the assistant's content
and the <|im_end|> closing its turn are in the loss (so the model learns to stop), everything else (system and user
messages, every role header, the newline after <|im_end|>) is not.

A conversation longer than `max_length` is cut into windows of whole exchanges (the user's turn and the assistant's
answer; a leading system message is repeated in every window). What cannot be trained on is counted by reason:
`too_long` (one exchange alone does not fit), `empty_mask` (no assistant token to learn from).

Batches are a pure function of (seed, step, micro-batch): the windows are shuffled once per epoch by a generator
keyed by (seed, epoch), so a resumed run reads exactly what an uninterrupted one reads. Rows are right-padded to
the batch's longest with a pad id that is not <|im_end|>; padding is never a target, and as it comes after every
real token, causal attention keeps it out of what real tokens see (no attention mask needed, positions from 0).

    >>> w = window_targets([1, 5, 6, 2], [False, True, True, True])   # ids, assistant mask
    >>> w.inputs, w.targets
    ([1, 5, 6], [5, 6, 2])
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset

from model.chat import IM_END, IM_START, encode_chat
from pipelines.common.errors import StageError

IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index in model/transformer.py)
REASONS = ("too_long", "empty_mask")
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>", "</s>")


class ChatDataError(StageError):
    """The chat data is missing or leaves nothing to train on; the message says what to do."""


@dataclass(frozen=True)
class Window:
    inputs: list[int]  # ids[:-1]
    targets: list[int]  # ids[1:], IGNORE where the token is not the assistant's


@dataclass
class Encoded:
    """One split's windows and what was left out."""

    windows: list[Window] = field(default_factory=list)
    conversations: int = 0
    split_conversations: int = 0  # conversations cut into more than one window
    dropped: Counter = field(default_factory=Counter)  # by reason (REASONS); an exchange or a whole conversation

    def summary(self) -> dict:
        return {
            "conversations": self.conversations,
            "windows": len(self.windows),
            "split_conversations": self.split_conversations,
            "tokens": sum(len(w.inputs) for w in self.windows),
            "target_tokens": sum(t != IGNORE for w in self.windows for t in w.targets),
            "dropped": {reason: self.dropped[reason] for reason in REASONS},
        }


def window_targets(ids: Sequence[int], assistant: Sequence[bool]) -> Window:
    """Inputs and next-token targets of one window; a target is kept only where the assistant wrote the token."""
    return Window(list(ids[:-1]), [t if mine else IGNORE for t, mine in zip(ids[1:], assistant[1:])])


def exchanges(roles: Sequence[str]) -> tuple[int, list[range]]:
    """(how many leading system messages, the exchanges as ranges of message indices): an exchange ends with a run
    of assistant messages; turns after the last assistant message (nobody answers them) form a last one."""
    first = next((i for i, role in enumerate(roles) if role != "system"), len(roles))
    out, start = [], first
    for i in range(first, len(roles)):
        if roles[i] == "assistant" and (i + 1 == len(roles) or roles[i + 1] != "assistant"):
            out.append(range(start, i + 1))
            start = i + 1
    if start < len(roles):
        out.append(range(start, len(roles)))
    return first, out


def message_pieces(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[tuple[list[int], list[bool]]]:
    """encode_chat's ids and assistant mask of a conversation, cut into one piece per message (each piece starts at
    its <|im_start|>, which literal content cannot contain). One encode_chat call per conversation."""
    e = encode_chat(tokenizer, messages, add_generation_prompt=False)
    starts = [i for i, t in enumerate(e.ids) if t == e.ids[0]] if e.ids else []
    if len(starts) != len(messages):
        raise ValueError("message content holds a ChatML marker: encode with model.chat.literal(tokenizer)")
    bounds = [*starts, len(e.ids)]
    return [(e.ids[a:b], e.assistant[a:b]) for a, b in zip(bounds, bounds[1:])]


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], max_length: int, tally: Encoded):
    """The windows of one conversation (appended to tally.windows), drops counted in tally.dropped."""
    tally.conversations += 1
    pieces = message_pieces(tokenizer, messages)
    n_system, parts = exchanges([m["role"] for m in messages])
    head_ids = [t for ids, _ in pieces[:n_system] for t in ids]
    head_mask = [m for _, mask in pieces[:n_system] for m in mask]
    made = 0
    ids, mask = list(head_ids), list(head_mask)

    def flush() -> None:
        nonlocal ids, mask, made
        if any(mask):
            end = len(mask) - mask[::-1].index(True)  # stop after the last target
            tally.windows.append(window_targets(ids[:end], mask[:end]))
            made += 1
        ids, mask = list(head_ids), list(head_mask)

    for part in parts:
        part_ids = [t for i in part for t in pieces[i][0]]
        part_mask = [m for i in part for m in pieces[i][1]]
        if not any(part_mask):
            tally.dropped["empty_mask"] += 1  # turns nobody answers: nothing to learn from
            continue
        if len(head_ids) + len(part_ids) - 1 > max_length:  # alone with the system prompt it does not fit
            tally.dropped["too_long"] += 1
            continue
        if len(ids) + len(part_ids) - 1 > max_length:
            flush()
        ids += part_ids
        mask += part_mask
    flush()
    tally.split_conversations += made > 1


def encode_split(tokenizer: Tokenizer, rows: Iterable[Mapping], max_length: int) -> Encoded:
    """Every conversation ({"messages": [...]}) of a split as windows."""
    tally = Encoded()
    for row in rows:
        encode_conversation(tokenizer, row["messages"], max_length, tally)
    return tally


def read_split(path: Path) -> list[dict]:
    if not path.is_file():
        raise ChatDataError(f"{path} not found: run dvc repro chat_data first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pad_id(tokenizer: Tokenizer, pad_token: str | None = None) -> int:
    """A padding id that is neither ChatML marker: the tokenizer's pad token if it is not one, else a usual pad
    or end-of-text token, else the lowest other id. (It is never a target, so its value only has to be valid.)"""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    markers = {vocab.get(IM_START), vocab.get(IM_END)}
    for name in (pad_token, *PAD_CANDIDATES):
        if name in vocab and vocab[name] not in markers:
            return vocab[name]
    return next(i for i in range(len(vocab) + 2) if i not in markers)


def collate(windows: Sequence[Window], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs right-padded with `pad` and (B, T) targets padded with IGNORE; T is the longest window."""
    T = max(len(w.inputs) for w in windows)
    x = torch.full((len(windows), T), pad, dtype=torch.long)
    y = torch.full((len(windows), T), IGNORE, dtype=torch.long)
    for i, w in enumerate(windows):
        x[i, : len(w.inputs)] = torch.tensor(w.inputs)
        y[i, : len(w.targets)] = torch.tensor(w.targets)
    return x, y


def sample_indices(n: int, batch_size: int, seed: int, k: int) -> list[int]:
    """The windows of micro-batch k: positions k*B .. k*B+B-1 of an endless stream of epochs, each a permutation
    keyed by (seed, epoch); a pure function of its arguments."""
    out = []
    for position in range(k * batch_size, (k + 1) * batch_size):
        epoch, i = divmod(position, n)
        out.append(int(_epoch_order(n, seed, epoch)[i]))
    return out


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class ChatBatches(IterableDataset):
    """Endless micro-batches starting at micro-batch `start`."""

    def __init__(self, windows: list[Window], batch_size: int, seed: int, pad: int, start: int = 0):
        self.windows, self.batch_size, self.seed, self.pad, self.start = windows, batch_size, seed, pad, start

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = sample_indices(len(self.windows), self.batch_size, self.seed, k)
        return collate([self.windows[i] for i in idx], self.pad)

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class ChatDataModule(pl.LightningDataModule):
    """Train batches keyed by the global step (resuming needs no data state) and fixed val batches (one device)."""

    def __init__(
        self,
        train: list[Window],
        val: list[Window],
        batch_size: int,
        grad_accum: int,
        seed: int,
        pad: int,
        val_batches: int,
    ):
        super().__init__()
        self.train, self.val, self.batch_size, self.grad_accum = train, val, batch_size, grad_accum
        self.seed, self.pad, self.val_batches = seed, pad, val_batches

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the loop state before asking for data, so global_step is the resumed step
        start = self.trainer.global_step * self.grad_accum if self.trainer is not None else 0
        dataset = ChatBatches(self.train, self.batch_size, self.seed, self.pad, start)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        rows = self.val[: self.val_batches * self.batch_size]
        batches = [collate(rows[i : i + self.batch_size], self.pad) for i in range(0, len(rows), self.batch_size)]
        return DataLoader(batches, batch_size=None, num_workers=0)
