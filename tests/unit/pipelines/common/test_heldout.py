"""Held-out bits per byte (pipelines/common/heldout.py): log2(vocab) per token for a uniform model, and by hand on
the evaluate project's model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model import GPT, GPTConfig
from tests.helpers.evaluation import held_out_docs, naive_loglik


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte(project):
    """All-zero weights give logits of 0: every token costs log2(V) bits, so bpb = tokens * log2(V) / bytes."""
    from pipelines.common.heldout import held_out

    vocab = json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"]
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=vocab))
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    docs = [[5, 6, 7] * 50, [9, 10]]  # 152 tokens; longer than block_size, so several windows
    got = held_out(model.eval(), docs, 0, n_bytes=300, stride=16, batch_size=4, desc=None)
    assert got["test_bpb"] == pytest.approx(152 * math.log2(vocab) / 300, rel=1e-6)
    assert got["test_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert got["test_ppl"] == pytest.approx(vocab, rel=1e-5)


def test_held_out_bpb_by_hand_on_fixture(engine, project):
    """bpb = -(sum of every test token's natural-log prob) / ln 2 / (UTF-8 bytes of the test text)."""
    from pipelines.common.heldout import held_out

    docs = held_out_docs(project)[:3]  # the naive computation runs one forward per token
    texts = [json.loads(line)["text"] for line in open(project / "data/clean/test.jsonl")][:3]
    n_bytes = sum(len(t.encode()) for t in texts)
    got = held_out(engine.model, docs, 0, n_bytes, stride=32, batch_size=8, desc=None)
    by_hand = -sum(naive_loglik(engine.model, d, 0, 32) for d in docs) / math.log(2) / n_bytes
    assert got["test_bpb"] == pytest.approx(by_hand, rel=1e-5)
    assert got["test_tokens"] == sum(len(d) for d in docs)
