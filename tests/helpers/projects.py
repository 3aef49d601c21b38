"""Tiny projects on disk: token shards, a random tiny model folder, and the tiny training settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import GPT, GPTConfig, save_pretrained
from pipelines.common.params import TokenizerParams
from pipelines.tokenize.stage import tokenize_corpus
from tests.helpers.corpus import write_clean

# A few seconds of training on the tiny preset: enough steps for two validations and several checkpoints.
TINY_TRAIN = dict(
    max_steps=16,
    batch_size=4,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=4,
    val_every=8,
    val_batches=2,
    log_every=2,
    checkpoint_every=4,
    seed=7,
)


def build_shards(root: Path) -> Path:
    """data/tokens and data/tokenizer of a tiny corpus under `root` (vocab 512)."""
    write_clean(root / "data" / "clean", n_train=40)
    tokenize_corpus(
        TokenizerParams(vocab_size=512, min_frequency=2),
        root / "data" / "clean",
        root / "data" / "tokenizer",
        root / "data" / "tokens",
        root / "metrics" / "tokenize.json",
    )
    return root / "data"


def save_model(out: Path, tokenizer_dir: Path, vocab: int, seed: int, block_size: int = 64) -> None:
    """A random tiny-preset model folder (Hugging Face layout) with the given tokenizer."""
    torch.manual_seed(seed)
    save_pretrained(
        GPT(GPTConfig.from_preset("tiny", vocab_size=vocab, block_size=block_size)), out, tokenizer_dir=tokenizer_dir
    )


def make_project(root: Path, seed: int = 0, model_seed: int = 0, block_size: int = 64) -> Path:
    """data/clean (verse-like lines), data/tokenizer, data/tokens and a tiny random model in artifacts/model."""
    write_clean(root / "data/clean", n_val=6, n_test=8, seed=seed, verse=True)
    tokenize_corpus(
        TokenizerParams(vocab_size=320, min_frequency=2),
        root / "data/clean",
        root / "data/tokenizer",
        root / "data/tokens",
        root / "metrics/tokenize.json",
    )
    vocab = json.loads((root / "data/tokens/meta.json").read_text())["vocab_size"]
    save_model(root / "artifacts/model", root / "data/tokenizer", vocab, model_seed, block_size)
    return root
