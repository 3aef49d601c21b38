"""tokenize: train a byte-level BPE tokenizer on (a sample of) the train split, then write token shards.

In:  data/clean/{train,val,test}.jsonl        (records with a "text" field, from the clean stage)
     params.yaml `tokenizer`                  (vocab_size, min_frequency, encode_batch_size, train_sample_bytes)
     params.yaml `data.engine`, `data.workers` where the work runs (pipelines/common/engine.py); the outputs are
                                              the same bytes on any engine, so dvc.yaml does not list them
Out: data/tokenizer/                          tokenizer.json, tokenizer_config.json, chat template;
                                              `transformers.AutoTokenizer.from_pretrained` loads it
     data/tokens/{train,val,test}.bin         flat uint16 (uint32 past 65536 tokens) ids, each document
                                              followed by <|endoftext|>; read back with np.memmap
     data/tokens/meta.json                    dtype, vocab size, special ids, per-split tokens/docs/bytes
     metrics/tokenize.json                    vocab_size, tokens per split, bytes_per_token,
                                              encode_mb_per_s, tokenizer_sha256
Run: python -m pipelines.tokenize            (or `dvc repro tokenize`)

At corpus scale (10-100 GB) memory and time stay bounded: the tokenizer learns from about `train_sample_bytes` of
train passages drawn by a hash of their text (sample.py; the whole split when it is smaller, as by default), and
each split is cut into line-aligned byte ranges (ranges.py) that tasks encode to part files in parallel
(encode.py), joined in order into `{split}.bin`. No step holds a whole split; the scratch parts live inside the
temporary `data/tokens` folder that replaces the old one only once everything is written.

(The module is not called tokenize.py: that would shadow the standard library's tokenize.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.common.atomic import atomic_dir, out_of_space_stops_stage, scratch_dir, write_json
from pipelines.common.clean_split import CleanSplitError, iter_texts
from pipelines.common.engine import Engine
from pipelines.common.hashing import sha256_file
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import DataParams, Params, TokenizerParams
from pipelines.common.runner import StageError, run_stage, stage_log
from pipelines.common.splits import SPLITS
from pipelines.tokenize.encode import encode_range
from pipelines.tokenize.ranges import byte_ranges, concatenate, lines_before
from pipelines.tokenize.sample import sample_range

CHUNK_BYTES = 16 * 2**20  # bytes of a split per task: enough to amortize loading the tokenizer, small enough to balance
IN_PROCESS = DataParams.model_construct(engine="local", workers=1)  # callers without params.yaml: tasks run here
LOG = stage_log("tokenize")

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


def bad_record(source: Path, start: int, line_no: int) -> CleanSplitError:
    """The error pipelines/common/clean_split.py raises for the line `line_no` of the range starting at `start`."""
    return CleanSplitError(
        f"{source}:{lines_before(source, start) + line_no} is not a clean record with a 'text' field; "
        "rerun the clean stage (dvc repro clean)."
    )


def check_results(sources: dict[str, Path], tasks: list[dict], results: list[dict]) -> None:
    """Raise for the first range, in file order, that a task could not read or encode, naming its split's line
    or document as if the split had been read in one pass."""
    docs_before: dict[str, int] = {}
    for task, result in zip(tasks, results):
        source = sources[task["split"]]
        if result["bad_line"] is not None:
            raise bad_record(source, task["start"], result["bad_line"])
        if result.get("altered"):
            batch_doc, doc = result["altered"]
            raise TokenizeError(
                f"{source} batch at document {docs_before.get(task['split'], 0) + batch_doc}: document {doc} does "
                "not survive encode/decode; this is a tokenizer bug, please report it with that document."
            )
        docs_before[task["split"]] = docs_before.get(task["split"], 0) + result["docs"]


def training_sample(source: Path, params: TokenizerParams, engine: Engine, scratch: Path, chunk_bytes: int) -> Path:
    """The train passages the tokenizer learns from (sample.py): the split itself when it is no larger than
    `train_sample_bytes`, else a JSONL file of the drawn ones under scratch."""
    size = source.stat().st_size
    if size <= params.train_sample_bytes:
        LOG(f"training the tokenizer on the whole of {source} ({size / 1e6:.1f} MB)")
        return source
    tasks = [
        {
            "source": str(source.resolve()),  # Ray workers run in another folder
            "start": start,
            "end": end,
            "split": "train",
            "fraction": params.train_sample_bytes / size,
            "part": str((scratch / f"sample.{i:05d}.jsonl").resolve()),
        }
        for i, (start, end) in enumerate(byte_ranges(source, chunk_bytes))
    ]
    results = engine.run(sample_range, tasks, desc="tokenize: sample", size=lambda t: t["end"] - t["start"])
    check_results({"train": source}, tasks, results)
    drawn = sum(r["bytes"] for r in results)
    if not drawn:
        LOG(f"no passage of {source} drawn (a few huge ones?): training the tokenizer on all {size / 1e6:.1f} MB")
        return source
    concatenate([Path(t["part"]) for t in tasks], scratch / "sample.jsonl")
    LOG(f"training the tokenizer on {drawn / 1e6:.1f} MB of text drawn from {source} ({size / 1e6:.1f} MB)")
    return scratch / "sample.jsonl"


def encode_splits(
    sources: dict[str, Path],
    tokenizer_file: Path,
    meta: dict,
    batch_size: int,
    engine: Engine,
    scratch: Path,
    tokens_dir: Path,
    chunk_bytes: int,
) -> dict[str, dict]:
    """Encode every split in byte-range tasks, then join each split's parts into `{split}.bin`; stats per split."""
    tasks = [
        {
            "source": str(source.resolve()),
            "start": start,
            "end": end,
            "split": split,
            "part": str((scratch / f"{split}.{i:05d}.bin").resolve()),
            "tokenizer": str(tokenizer_file.resolve()),
            "eot_id": meta["eot_id"],
            "dtype": meta["dtype"],
            "batch_size": batch_size,
        }
        for split, source in sources.items()
        for i, (start, end) in enumerate(byte_ranges(source, chunk_bytes))
    ]
    results = engine.run(encode_range, tasks, desc="tokenize: encode", size=lambda t: t["end"] - t["start"])
    check_results(sources, tasks, results)
    splits = {}
    for split in sources:
        mine = [(t, r) for t, r in zip(tasks, results) if t["split"] == split]
        concatenate([Path(t["part"]) for t, _ in mine], tokens_dir / f"{split}.bin")
        splits[split] = {key: sum(r[key] for _, r in mine) for key in ("docs", "bytes", "tokens")}
    return splits


def tokenize_corpus(
    params: TokenizerParams,
    clean_dir: Path = PROJECT.clean,
    tokenizer_dir: Path = PROJECT.tokenizer,
    tokens_dir: Path = PROJECT.tokens,
    metrics_file: Path = PROJECT.tokenize_metrics,
    *,
    data: DataParams = IN_PROCESS,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Train the tokenizer on (a sample of) train, encode every split on `data.engine`, write outputs atomically;
    return the metrics."""
    sources = {split: clean_dir / f"{split}.jsonl" for split in SPLITS}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise TokenizeError(f"missing {', '.join(missing)}: run the clean stage first (dvc repro clean).")
    if not any(text.strip() for text in iter_texts(sources["train"])):
        raise TokenizeError(
            f"{sources['train']} holds no text to train the tokenizer on; "
            "check reports/clean/report.md for why documents were dropped."
        )

    with (
        atomic_dir(tokenizer_dir) as tok_tmp,
        atomic_dir(tokens_dir) as tokens_tmp,
        out_of_space_stops_stage(),
        scratch_dir(tokens_tmp, ".parts.") as scratch,
        Engine(data, preload=[sample_range.__module__, encode_range.__module__]) as engine,  # one pool, both steps
    ):
        started = time.perf_counter()
        sample = training_sample(sources["train"], params, engine, scratch, chunk_bytes)
        tokenizer = train_tokenizer(iter_texts(sample), params)
        train_seconds = time.perf_counter() - started
        tokenizer.encode_special_tokens = True  # "<|endoftext|>" typed in a document is text, not a separator
        save_tokenizer(tokenizer, tok_tmp)
        tokenizer_sha = sha256_file(tok_tmp / "tokenizer.json")

        vocab_size = tokenizer.get_vocab_size()
        meta = {
            "dtype": token_dtype(vocab_size).name,
            "vocab_size": vocab_size,
            "eot_token": EOT,
            "eot_id": tokenizer.token_to_id(EOT),
            "special_tokens": {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS},
        }
        started = time.perf_counter()
        splits = encode_splits(
            sources,
            tok_tmp / "tokenizer.json",
            meta,
            params.encode_batch_size,
            engine,
            scratch,
            tokens_tmp,
            chunk_bytes,
        )
        encode_seconds = time.perf_counter() - started

        text_bytes = sum(s["bytes"] for s in splits.values())
        text_tokens = sum(s["tokens"] - s["docs"] for s in splits.values())  # EOT separators carry no text
        bytes_per_token = round(text_bytes / max(text_tokens, 1), 4)
        meta |= {"splits": splits, "bytes_per_token": bytes_per_token, "tokenizer_sha256": tokenizer_sha}
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
    metrics = tokenize_corpus(
        params.tokenizer, layout.clean, layout.tokenizer, layout.tokens, layout.tokenize_metrics, data=params.data
    )
    return (
        f"vocab {metrics['vocab_size']}, tokens {metrics['tokens']}, "
        f"{metrics['bytes_per_token']} bytes/token, {metrics['encode_mb_per_s']} MB/s"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.tokenize [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("tokenize", summarize, argv)
