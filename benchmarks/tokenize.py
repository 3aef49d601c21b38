"""Encoding throughput of the tokenize stage against a single-threaded `Tokenizer.encode` loop.

Both sides encode the same documents (data/clean/*.jsonl) with the same tokenizer (data/tokenizer/) and
must produce identical ids. Ours is the stage's own `encode_documents` over `encode_batch_size` batches;
the stage's full path (encode + round-trip check + shard write) is reported beside it.

Run: python -m benchmarks.tokenize      (after `dvc repro tokenize`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from pipelines.common.clean_split import read_texts
from pipelines.common.layout import Layout
from pipelines.common.params import load_params
from pipelines.tokenize.encode import batches, encode_documents, encode_range
from pipelines.tokenize.stage import EOT, SPLITS


def best_of(repeats: int, fn) -> tuple[float, object]:
    """The fastest of `repeats` runs (the least disturbed by other work on the machine), and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer_file = Layout().tokenizer / "tokenizer.json"
    if not tokenizer_file.is_file() or not (Layout().clean / "train.jsonl").is_file():
        print("benchmark tokenize: no data yet; run `dvc repro tokenize` (or `make run`) first", file=sys.stderr)
        return 1
    batch_size = load_params().tokenizer.encode_batch_size
    texts = [t for split in SPLITS for t in read_texts(Layout().clean / f"{split}.jsonl")]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.encode_special_tokens = True  # as the stage encodes
    baseline_tok = Tokenizer.from_file(str(tokenizer_file))
    baseline_tok.encode_special_tokens = True

    def ours():
        return [ids for batch in batches(iter(texts), batch_size) for ids in encode_documents(tokenizer, batch)]

    def baseline():
        return [baseline_tok.encode(t, add_special_tokens=False).ids for t in texts]

    ours_s, ours_ids = best_of(args.repeats, ours)
    base_s, base_ids = best_of(args.repeats, baseline)
    assert ours_ids == base_ids, "ours and the baseline disagree on token ids"

    def stage_path():  # the stage's task, one per split, in this process
        with tempfile.TemporaryDirectory() as tmp:
            for split in SPLITS:
                source = Layout().clean / f"{split}.jsonl"
                task = {"source": str(source), "start": 0, "end": source.stat().st_size, "batch_size": batch_size}
                task |= {"part": str(Path(tmp) / f"{split}.bin"), "tokenizer": str(tokenizer_file)}
                encode_range(task | {"eot_id": tokenizer.token_to_id(EOT), "dtype": "uint16"})

    stage_s, _ = best_of(args.repeats, stage_path)
    print(
        f"{len(texts)} documents, {megabytes:.1f} MB, {sum(map(len, ours_ids))} tokens, "
        f"RAYON threads: {os.environ.get('RAYON_NUM_THREADS', os.cpu_count())}"
    )
    print(f"ours (encode_batch_fast, batch {batch_size}): {megabytes / ours_s:.2f} MB/s")
    print(f"baseline (Tokenizer.encode loop):            {megabytes / base_s:.2f} MB/s")
    print(f"stage path (encode + round-trip check + write): {megabytes / stage_s:.2f} MB/s")
    print(
        json.dumps(
            {
                "benchmark": "tokenize",
                "ours": round(megabytes / ours_s, 3),
                "baseline": round(megabytes / base_s, 3),
                "unit": "MB/s",
                "ratio": round(base_s / ours_s, 3),
                "stage_mb_per_s": round(megabytes / stage_s, 3),
                "stage_ratio": round(base_s / stage_s, 3),
                "documents": len(texts),
                "megabytes": round(megabytes, 2),
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
