"""tokenize: train a byte-level BPE tokenizer on the train split, then write token shards.

In:  data/clean/{train,val,test}.jsonl        (records with a "text" field, from the clean stage)
     params.yaml `tokenizer`                  (vocab_size, min_frequency, encode_batch_size)
Out: data/tokenizer/                          tokenizer.json, tokenizer_config.json, chat template;
                                              `transformers.AutoTokenizer.from_pretrained` loads it
     data/tokens/{train,val,test}.bin         flat uint16 (uint32 past 65536 tokens) ids, each document
                                              followed by <|endoftext|>; read back with np.memmap
     data/tokens/meta.json                    dtype, vocab size, special ids, per-split tokens/docs/bytes
     metrics/tokenize.json                    vocab_size, tokens per split, bytes_per_token,
                                              encode_mb_per_s, tokenizer_sha256
Run: python -m pipelines.tokenize            (or `dvc repro tokenize`)

(The module is not called tokenize.py: that would shadow the standard library's tokenize.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from pipelines.common.atomic import atomic_dir, write_json
from pipelines.common.clean_split import iter_texts
from pipelines.common.hashing import sha256_file
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import Params, TokenizerParams
from pipelines.common.progress import reporter
from pipelines.common.runner import StageError, run_stage

SPLITS = ("train", "val", "test")

EOT = "<|endoftext|>"  # separates documents; also bos/eos/pad for Hugging Face tools
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML role markers for the chat API
SPECIAL_TOKENS = (EOT, *CHAT_TOKENS)  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TokenizeError(StageError):
    """The inputs cannot be tokenized; the message says why and what to do."""


def train_tokenizer(texts: Iterator[str], params: TokenizerParams) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every string encodes (no unknown token) and decodes back exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Save in the Hugging Face layout, so AutoTokenizer.from_pretrained(out_dir) gives the same ids."""
    from transformers import PreTrainedTokenizerFast  # lazily: transformers takes seconds to import

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT, extra_special_tokens=list(CHAT_TOKENS)
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, encoded in parallel by the Rust library's thread pool (no offsets computed)."""
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def check_round_trip(tokenizer: Tokenizer, texts: list[str], ids: list[list[int]], where: str) -> None:
    """decode(encode(text)) == text for every document, or a loud error: a shard must never hold altered text."""
    for i, (text, back) in enumerate(zip(texts, tokenizer.decode_batch(ids, skip_special_tokens=False))):
        if back != text:
            raise TokenizeError(
                f"{where}: document {i + 1} does not survive encode/decode; "
                "this is a tokenizer bug, please report it with that document."
            )


def encode_split(
    tokenizer: Tokenizer, source: Path, target: Path, batch_size: int, dtype: np.dtype, progress: tqdm
) -> dict:
    """Encode one split in batches to a flat token file, each document followed by EOT."""
    eot_id = tokenizer.token_to_id(EOT)
    stats = {"docs": 0, "bytes": 0, "tokens": 0}
    with open(target, "wb") as out:
        for texts in batches(iter_texts(source), batch_size):
            ids = encode_documents(tokenizer, texts)
            check_round_trip(tokenizer, texts, ids, f"{source} batch at document {stats['docs'] + 1}")
            flat: list[int] = []
            for doc in ids:
                flat += doc
                flat.append(eot_id)
            np.asarray(flat, dtype=dtype).tofile(out)
            size = sum(len(t.encode("utf-8")) for t in texts)
            stats["docs"] += len(texts)
            stats["bytes"] += size
            stats["tokens"] += len(flat)
            progress.update(size)
    return stats


def tokenize_corpus(
    params: TokenizerParams,
    clean_dir: Path = PROJECT.clean,
    tokenizer_dir: Path = PROJECT.tokenizer,
    tokens_dir: Path = PROJECT.tokens,
    metrics_file: Path = PROJECT.tokenize_metrics,
) -> dict:
    """Train the tokenizer on train, encode every split, write outputs atomically; return the metrics."""
    sources = {split: clean_dir / f"{split}.jsonl" for split in SPLITS}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise TokenizeError(f"missing {', '.join(missing)}: run the clean stage first (dvc repro clean).")
    if not any(text.strip() for text in iter_texts(sources["train"])):
        raise TokenizeError(
            f"{sources['train']} holds no text to train the tokenizer on; "
            "check reports/clean/report.md for why documents were dropped."
        )

    with atomic_dir(tokenizer_dir) as tok_tmp, atomic_dir(tokens_dir) as tokens_tmp:
        started = time.perf_counter()
        tokenizer = train_tokenizer(iter_texts(sources["train"]), params)
        train_seconds = time.perf_counter() - started
        tokenizer.encode_special_tokens = True  # "<|endoftext|>" typed in a document is text, not a separator
        save_tokenizer(tokenizer, tok_tmp)
        tokenizer_sha = sha256_file(tok_tmp / "tokenizer.json")

        vocab_size = tokenizer.get_vocab_size()
        dtype = token_dtype(vocab_size)
        total_bytes = sum(p.stat().st_size for p in sources.values())
        splits = {}
        started = time.perf_counter()
        with reporter(total_bytes, "tokenize", "B", unit_scale=True) as progress:
            for split, source in sources.items():
                splits[split] = encode_split(
                    tokenizer, source, tokens_tmp / f"{split}.bin", params.encode_batch_size, dtype, progress
                )
        encode_seconds = time.perf_counter() - started

        text_bytes = sum(s["bytes"] for s in splits.values())
        text_tokens = sum(s["tokens"] - s["docs"] for s in splits.values())  # EOT separators carry no text
        bytes_per_token = round(text_bytes / max(text_tokens, 1), 4)
        meta = {
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eot_token": EOT,
            "eot_id": tokenizer.token_to_id(EOT),
            "special_tokens": {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS},
            "splits": splits,
            "bytes_per_token": bytes_per_token,
            "tokenizer_sha256": tokenizer_sha,
        }
        write_json(tokens_tmp / "meta.json", meta)
    metrics = {
        "vocab_size": vocab_size,
        "tokens": {split: s["tokens"] for split, s in splits.items()},
        "bytes_per_token": bytes_per_token,
        "encode_mb_per_s": round(text_bytes / 1e6 / max(encode_seconds, 1e-9), 3),
        "train_tokenizer_seconds": round(train_seconds, 3),
        "tokenizer_sha256": tokenizer_sha,
    }
    write_json(metrics_file, metrics)
    return metrics


def summarize(params: Params, layout: Layout) -> str:
    """Run the stage on data/clean; the line printed on success."""
    metrics = tokenize_corpus(params.tokenizer, layout.clean, layout.tokenizer, layout.tokens, layout.tokenize_metrics)
    return (
        f"vocab {metrics['vocab_size']}, tokens {metrics['tokens']}, "
        f"{metrics['bytes_per_token']} bytes/token, {metrics['encode_mb_per_s']} MB/s"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.tokenize [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("tokenize", summarize, argv)
