"""What the tests of held-out scoring and evaluation share on make_project's project (tests/helpers/projects.py):
its held-out documents and clean splits, and a document's log-likelihood computed token by token, one forward
each, with the context the window rule gives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from model.scoring import rolling_windows
from pipelines.common.lm_eval_adapter import split_documents


def held_out_docs(project) -> list[list[int]]:
    meta = json.loads((project / "data/tokens/meta.json").read_text())
    tokens = np.fromfile(project / "data/tokens/test.bin", dtype=meta["dtype"])
    return split_documents(tokens, meta["eot_id"])


def naive_loglik(model, doc: list[int], prefix: int, stride: int) -> float:
    """Hand computation: each token's logprob with the context the window rule gives it, one forward each."""
    bs = model.config.block_size
    x = [prefix, *doc]
    total = 0.0
    for start, end, n_scored in rolling_windows(len(doc), bs, stride):
        for i in range(end - n_scored, end):  # predict x[i + 1] from x[start : i + 1]
            with torch.no_grad():
                logits, _ = model(torch.tensor([x[start : i + 1]]))
            total += torch.log_softmax(logits[0, -1], -1)[x[i + 1]].item()
    return total


def read_split(project: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in open(project / f"data/clean/{split}.jsonl")]
