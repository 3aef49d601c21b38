"""data.engine: ray against the suite's shared Ray cluster: the clean and tokenize stages' steps run as Ray Data
tasks on its workers and give the local engine's outputs byte for byte (corpus cut into many shards, partitions
and byte ranges, so every step runs several tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.clean import shards
from pipelines.common.params import DataParams, TokenizerParams
from pipelines.tokenize.stage import tokenize_corpus
from tests.helpers.corpus import raw_from_folder, run_clean, write_planted_corpus

LOCAL = DataParams(sources=[{"type": "local", "path": "corpus"}], min_chars=50, workers=1)
TOKENIZER = TokenizerParams(vocab_size=300, train_sample_bytes=1 << 16)


def build(root: Path, data: DataParams) -> dict[str, bytes]:
    """Clean then tokenize under `root`; every output file's bytes (metrics without their timings)."""
    run_clean(root, data)
    tokenize_corpus(
        TOKENIZER,
        root / "data/clean",
        root / "data/tokenizer",
        root / "data/tokens",
        root / "metrics/tokenize.json",
        data=data,
        chunk_bytes=4000,
    )
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "raw" not in p.parts):
        name = path.relative_to(root).as_posix()
        found[name] = path.read_bytes()
        if name.startswith("metrics/"):
            metrics = json.loads(found[name])
            found[name] = json.dumps({k: v for k, v in metrics.items() if "seconds" not in k and "per_s" not in k})
    return found


def test_the_ray_engine_gives_the_local_engines_bytes(
    shared_ray: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "MIN_SHARD_BYTES", 1)
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 6000)
    monkeypatch.setattr(shards, "PARTITION_BYTES", 8000)
    write_planted_corpus(tmp_path / "corpus", n_docs=40)
    for name in ("local", "ray"):
        raw_from_folder(tmp_path / "corpus", tmp_path / name)
    local = build(tmp_path / "local", LOCAL)
    on_ray = build(tmp_path / "ray", LOCAL.model_copy(update={"engine": "ray"}))
    assert on_ray.keys() == local.keys()
    assert [name for name in local if on_ray[name] != local[name]] == []
    metrics = json.loads(local["metrics/clean.json"])
    assert metrics["exact_duplicates"] and metrics["near_duplicates"]  # the dedup steps had work to do
