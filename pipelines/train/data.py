"""Training data: random windows of the token shards, as a pure function of (seed, step, micro-batch, rank).

The train stream has no state to save: micro-batch k of rank r is drawn from a generator seeded with
(seed, r, k // grad_accum, k % grad_accum), so a run resumed at step s reads exactly the windows an
uninterrupted run reads from step s on, none repeated or skipped. Validation uses a fixed set of
evenly spaced windows of val.bin, the same at every evaluation.

    >>> offsets = window_offsets(n_tokens=10_000, block_size=64, batch_size=4, seed=0, step=3, micro=0, rank=0)
    >>> len(offsets)
    4
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipelines.common.runner import StageError

SPLITS = ("train", "val", "test")


class DataError(StageError):
    """The token shards are missing or unusable; the message says what to do."""


@dataclass(frozen=True)
class TokenData:
    """The tokenize stage's outputs (data/tokens/meta.json and the .bin shards)."""

    directory: Path
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> TokenData:
        directory = Path(directory)
        meta_file = directory / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{meta_file} not found: run dvc repro tokenize first")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        for split in ("train", "val"):
            if not (directory / f"{split}.bin").is_file():
                raise DataError(f"{directory / f'{split}.bin'} not found: run dvc repro tokenize first")
        return cls(directory, meta)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.directory / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")

    def bytes_per_text_token(self, split: str) -> float:
        """UTF-8 bytes per token of text in `split` (EOT separators carry no bytes, so they are not counted)."""
        s = self.meta["splits"][split]
        return s["bytes"] / max(s["tokens"] - s["docs"], 1)


def window_offsets(
    n_tokens: int, block_size: int, batch_size: int, seed: int, step: int, micro: int, rank: int
) -> np.ndarray:
    """Start offsets of the `batch_size` windows of (step, micro-batch, rank): a pure function of its arguments."""
    high = n_tokens - block_size - 1  # a window holds block_size + 1 tokens (inputs and shifted targets)
    if high < 1:
        raise DataError(
            f"the train split has {n_tokens} tokens, fewer than one window of {block_size + 1}; "
            "use a smaller model.block_size or more data"
        )
    rng = np.random.default_rng([seed, rank, step, micro])
    return rng.integers(0, high + 1, size=batch_size)


def gather_windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> torch.Tensor:
    """(B, block_size + 1) int64 windows starting at `offsets`."""
    idx = offsets[:, None] + np.arange(block_size + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def val_offsets(n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """`count` evenly spaced window offsets over the whole split (fixed: the same at every evaluation)."""
    high = n_tokens - block_size - 1
    if high < 0:
        raise DataError(
            f"the val split has {n_tokens} tokens, fewer than one window of {block_size + 1}; "
            "use a smaller model.block_size or a larger data.split.val"
        )
    return np.linspace(0, high, num=count).astype(np.int64)


class TrainWindows(IterableDataset):
    """Endless micro-batches (B, T+1) of one rank, starting at micro-batch `start`."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int,
        start: int = 0,
    ):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.grad_accum, self.seed, self.rank, self.start = grad_accum, seed, rank, start

    def batch(self, k: int) -> torch.Tensor:
        step, micro = divmod(k, self.grad_accum)
        offsets = window_offsets(len(self.tokens), self.block_size, self.batch_size, self.seed, step, micro, self.rank)
        return gather_windows(self.tokens, offsets, self.block_size)

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class TokenDataModule(pl.LightningDataModule):
    """Train windows keyed by the global step (so resuming needs no data state) and fixed val windows."""

    def __init__(self, data: TokenData, block_size: int, batch_size: int, grad_accum: int, seed: int, val_batches: int):
        super().__init__()
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.grad_accum, self.seed, self.val_batches = grad_accum, seed, val_batches

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the loop state before asking for data, so global_step is the resumed step
        trainer = self.trainer
        start = trainer.global_step * self.grad_accum if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        dataset = TrainWindows(
            self.data.tokens("train"), self.block_size, self.batch_size, self.grad_accum, self.seed, rank, start
        )
        return DataLoader(dataset, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())

    def val_batches_for_rank(self, rank: int, world_size: int) -> list[torch.Tensor]:
        tokens = self.data.tokens("val")
        offsets = val_offsets(len(tokens), self.block_size, self.val_batches * self.batch_size)
        batches = [gather_windows(tokens, o, self.block_size) for o in np.split(offsets, self.val_batches)]
        return batches[rank::world_size] or batches[:1]

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(
            self.val_batches_for_rank(rank, world), batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available()
        )
