"""pipelines/train/resume.py: what identifies a run's configuration, and what changed."""

from __future__ import annotations

from pipelines.common.params import TrainParams
from pipelines.train.resume import fingerprint, incompatibilities

SHARDS = {name: {"bytes": 100, "sha256": name * 8} for name in ("meta.json", "train.bin", "val.bin")}


def test_incompatibilities_name_what_changed():
    base = {
        "model_config": {"n_layer": 2, "n_embd": 64},
        "tokenizer_sha256": "a" * 64,
        "shards": SHARDS,
        "world_size": 1,
        "train": TrainParams().model_dump(),
        "total_steps": 1000,
    }
    assert incompatibilities(base, base, False) == []
    changed = {**base, "model_config": {"n_layer": 3, "n_embd": 64}}
    assert incompatibilities(base, changed, False) == ["model.n_layer changed from 2 to 3"]
    assert "the tokenizer changed" in incompatibilities(base, {**base, "tokenizer_sha256": "b" * 64}, False)[0]
    shard = {**base, "shards": {**SHARDS, "train.bin": {"bytes": 100, "sha256": "x" * 64}}}  # same meta.json
    assert incompatibilities(base, shard, False) == ["the token shards changed (train.bin in data/tokens)"]
    more = {**base, "world_size": 4}
    assert "world size changed from 1 to 4" in incompatibilities(base, more, False)[0]
    assert incompatibilities(base, more, True) == []
    hardware = {**base, "train": {**base["train"], "val_every": 7, "compile": True, "devices": 2}}
    assert incompatibilities(base, hardware, False) == []  # may change on resume
    lr = {**base, "train": {**base["train"], "lr": 0.5}}
    assert incompatibilities(base, lr, False) == ["train.lr changed from 0.001 to 0.5"]
    longer = {**base, "train": {**base["train"], "max_steps": 5000}, "total_steps": 5000}
    assert incompatibilities(base, longer, False)[0] == "train.max_steps changed from 1000 to 5000"  # the schedule


def test_the_fingerprint_covers_what_shapes_the_weights_and_nothing_else():
    base = {
        "model_config": {"n_layer": 2},
        "tokenizer_sha256": "a",
        "shards": SHARDS,
        "train": TrainParams().model_dump(),
        "world_size": 1,
        "mlflow_run_id": "r1",
    }
    same = [
        {**base, "world_size": 2, "mlflow_run_id": "r2"},
        {**base, "train": {**base["train"], "compile": True, "val_every": 5, "devices": 2, "precision": "32"}},
    ]
    assert {fingerprint(r) for r in same} == {fingerprint(base)}
    other = [
        {**base, "model_config": {"n_layer": 3}},
        {**base, "tokenizer_sha256": "b"},
        {**base, "shards": {**SHARDS, "val.bin": {"bytes": 100, "sha256": "y"}}},
        {**base, "shards": {**SHARDS, "train.bin": {"bytes": 101, "sha256": "train.bin" * 8}}},
        {**base, "train": {**base["train"], "max_steps": 7}},
        {**base, "train": {**base["train"], "seed": 1}},
        {**base, "train": {**base["train"], "max_tokens": 10**6}},
    ]
    assert len({fingerprint(r) for r in other} | {fingerprint(base)}) == len(other) + 1
