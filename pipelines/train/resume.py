"""Which checkpoints a training run resumes from: one folder per configuration, checkpoints/<fingerprint>/
(the folders themselves: pipelines/common/training/resume.py).

The fingerprint hashes everything that shapes the weights a run ends with: the model config, the tokenizer,
the token shards training reads (meta.json, train.bin, val.bin: their sizes and sha256), and every `train.*`
key except those that may change on resume (RESUMABLE_CHANGES: hardware and cadence). So, run again:

- the same configuration after an interruption: it resumes from checkpoints/<fingerprint>/; after it
  finished: it re-exports the final checkpoint without training;
- another configuration (`dvc exp run -S model.n_embd=96`, a new tokenizer or corpus, another max_steps):
  it starts fresh in its own folder. An interrupted run of another configuration is kept, and a log line
  says where and what differs (restore those params to resume it); a finished one is removed (its model is
  in artifacts/, DVC's cache and MLflow, and it would never train again).

`train.max_steps` and `train.max_tokens` are part of the fingerprint: the cosine schedule is laid out over
them, so resuming under a new value would reshape the learning rate while the MLflow run kept the old one.
A new value is a new run with its own MLflow run.

    >>> fingerprint({"model_config": {...}, "tokenizer_sha256": "...", "shards": {...}, "train": {...}})
    '3f0c9a2e51d7b604'
"""

from __future__ import annotations

from pathlib import Path

from pipelines.common.hashing import sha256_file
from pipelines.common.training.resume import digest
from pipelines.common.training.resume import settle_other_runs as settle

# train.* keys that may change between an interrupted run and its resumption without changing its weights
# (beyond float rounding on other hardware); any other key is part of the configuration's fingerprint
RESUMABLE_CHANGES = {
    "precision",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "compile",
    "val_every",
    "val_batches",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "allow_world_size_change",
}
SHARDS = ("meta.json", "train.bin", "val.bin")  # what training reads of data/tokens


def shard_digests(tokens: Path) -> dict[str, dict]:
    """{file: {"bytes", "sha256"}} of the token files training reads."""
    return {name: {"bytes": (tokens / name).stat().st_size, "sha256": sha256_file(tokens / name)} for name in SHARDS}


def fingerprint(run_info: dict) -> str:
    """16 hex digits naming the configuration of `run_info` (see the module docstring for what it covers)."""
    identity = {
        "model_config": run_info["model_config"],
        "tokenizer_sha256": run_info["tokenizer_sha256"],
        "shards": run_info["shards"],
        "train": {k: v for k, v in run_info["train"].items() if k not in RESUMABLE_CHANGES},
    }
    return digest(identity)


def incompatibilities(saved: dict, current: dict, allow_world_size_change: bool) -> list[str]:
    """What differs between a checkpoint's run info and this run's, in words; empty if it may resume."""
    problems = []
    for key in sorted(set(saved["model_config"]) | set(current["model_config"])):
        old, new = saved["model_config"].get(key), current["model_config"].get(key)
        if old != new:
            problems.append(f"model.{key} changed from {old} to {new}")
    if saved["tokenizer_sha256"] != current["tokenizer_sha256"]:
        problems.append(
            f"the tokenizer changed (sha256 {saved['tokenizer_sha256'][:12]}... -> "
            f"{current['tokenizer_sha256'][:12]}...)"
        )
    elif saved.get("shards") != current["shards"]:
        old_shards = saved.get("shards") or {}
        changed = [name for name in SHARDS if old_shards.get(name) != current["shards"].get(name)]
        problems.append(f"the token shards changed ({', '.join(changed)} in data/tokens)")
    if saved["world_size"] != current["world_size"] and not allow_world_size_change:
        problems.append(
            f"the world size changed from {saved['world_size']} to {current['world_size']} devices "
            "(set train.allow_world_size_change: true to resume anyway, with a different data order)"
        )
    for key in sorted(set(saved["train"]) | set(current["train"])):
        if key not in RESUMABLE_CHANGES and saved["train"].get(key) != current["train"].get(key):
            problems.append(f"train.{key} changed from {saved['train'].get(key)} to {current['train'].get(key)}")
    if saved.get("total_steps") not in (None, current.get("total_steps")) and current.get("total_steps"):
        problems.append(
            f"the schedule's length changed from {saved['total_steps']} to {current['total_steps']} "
            "steps (train.max_tokens on another world size)"
        )
    return problems


def settle_other_runs(root: Path, current: dict, current_fingerprint: str) -> list[str]:
    """Keep interrupted runs of other configurations, remove finished ones; the log lines saying what was done."""

    def describe(info: dict) -> list[str]:
        return incompatibilities(info, current, True) if info.get("model_config") else []

    return settle(root, current_fingerprint, describe)
