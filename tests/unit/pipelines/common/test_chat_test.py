"""pipelines/common/chat_test.py: the held-out sample is a pure function of the conversations themselves; only the
assistant's content is scored, each token given the conversation before it; long conversations are cut into windows
that score every reply token once."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from model import GPT
from model.chat import chat_markers, encode_chat, literal
from pipelines.common.chat_test import IGNORE, conversation_windows, cover, held_out_conversations, response_score
from tests.helpers.chat import CHAT, conversation
from tests.helpers.corpus import WORDS
from tests.helpers.models import tiny
from tests.helpers.tokenizers import byte_bpe

CONVERSATIONS = [
    CHAT,  # a system message, two exchanges
    [
        {"role": "user", "content": "Say <|im_end|> to me 🙂"},
        {"role": "assistant", "content": "<|im_end|> 🙂 — the king, 王"},  # literal markers, multi-byte characters
    ],
    [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": ""}],  # nothing to score
]


@pytest.fixture(scope="module")
def tokenizer():
    return literal(byte_bpe([" ".join(WORDS)] * 4))


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(vocab_size=tokenizer.get_vocab_size(), block_size=256)).eval()  # every conversation fits


def hand_nats(model: GPT, tokenizer, messages: list[dict]) -> tuple[float, int]:
    """(-sum ln p, tokens) of each assistant message's content given the ChatML conversation before it, one
    forward per reply: the conversation up to the reply's header, then the content's own ids."""
    _, im_end = chat_markers(tokenizer)
    newline = tokenizer.encode("\n").ids
    nats, tokens = 0.0, 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = encode_chat(tokenizer, messages[:i], add_generation_prompt=True).ids
        full = encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False).ids
        assert full[: len(prefix)] == prefix and full[-1 - len(newline) :] == [im_end, *newline]
        content = full[len(prefix) : -1 - len(newline)]
        if not content:
            continue
        with torch.no_grad():
            logits, _ = model(torch.tensor([prefix + content]))
        logp = torch.log_softmax(logits[0], dim=-1)
        nats -= sum(logp[len(prefix) - 1 + k, t].item() for k, t in enumerate(content))
        tokens += len(content)
    return nats, tokens


def test_only_the_assistant_content_is_scored_given_the_conversation_before_it(model, tokenizer):
    got = response_score(model, tokenizer, CONVERSATIONS, batch_size=2)
    expected = [hand_nats(model, tokenizer, m) for m in CONVERSATIONS]
    # user and system tokens, role headers or <|im_end|> counted would change both numbers
    assert got.nats == pytest.approx(sum(n for n, _ in expected), rel=1e-5)
    assert got.tokens == sum(t for _, t in expected)
    replies = [m["content"] for c in CONVERSATIONS for m in c if m["role"] == "assistant"]
    assert got.bytes == sum(len(r.encode("utf-8")) for r in replies)
    assert got.bpb == pytest.approx(got.nats / math.log(2) / got.bytes)


def test_batching_does_not_change_the_score(model, tokenizer):
    one = response_score(model, tokenizer, CONVERSATIONS, batch_size=1)
    assert response_score(model, tokenizer, CONVERSATIONS, batch_size=8).nats == pytest.approx(one.nats, rel=1e-5)


@pytest.mark.parametrize(("n", "block_size"), [(50, 8), (50, 64), (9, 8), (200, 16)])
def test_windows_score_every_position_once_within_the_context(n, block_size):
    ids = list(range(1000, 1000 + n))
    positions = [p for p in range(1, n) if p % 3]
    windows = cover(ids, positions, block_size)
    scored = sorted(t - 1000 for w in windows for t in w.targets if t != IGNORE)
    assert scored == positions
    for w in windows:
        assert len(w.inputs) <= block_size and len(w.inputs) == len(w.targets)
        assert w.targets[-1] != IGNORE  # it ends at the latest token it scores, with the most context before it
        for k, t in enumerate(w.targets):
            if t != IGNORE:
                assert ids.index(w.inputs[k]) + 1 == ids.index(t)  # input k predicts the token after it


def scored(windows) -> int:
    return sum(t != IGNORE for w in windows for t in w.targets)


def test_a_conversation_longer_than_the_context_is_scored_a_reply_at_a_time(tokenizer):
    long = [m for _ in range(6) for m in CHAT[1:]]  # 12 messages, far more than 64 tokens
    assert len(encode_chat(tokenizer, long, add_generation_prompt=False).ids) > 64
    windows = conversation_windows(tokenizer, long, block_size=64)
    assert len(windows) >= 6 and all(len(w.inputs) <= 64 for w in windows)  # one window (or more) per reply
    assert scored(windows) == scored(conversation_windows(tokenizer, long, block_size=10_000))
    fits = len(encode_chat(tokenizer, CHAT, add_generation_prompt=False).ids)
    assert len(conversation_windows(tokenizer, CHAT, block_size=fits)) == 1  # one window for both replies


# -- which conversations ------------------------------------------------------------------------------------------
def write(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    return path


def test_the_sample_does_not_depend_on_the_file_order_and_keeps_it(tmp_path):
    rng = random.Random(0)
    conversations = [conversation(rng, turns=1 + i % 3) for i in range(30)]
    sample = held_out_conversations(write(tmp_path / "a.jsonl", conversations), max_conversations=10)
    shuffled = held_out_conversations(write(tmp_path / "b.jsonl", conversations[::-1]), max_conversations=10)
    assert len(sample) == 10 and sorted(map(json.dumps, sample)) == sorted(map(json.dumps, shuffled))
    assert sample == [m for m in conversations if m in sample]  # in the file's order
    # a larger cap keeps these and adds others; dropping conversations outside the sample changes nothing
    larger = held_out_conversations(write(tmp_path / "c.jsonl", conversations), max_conversations=20)
    assert all(m in larger for m in sample)
    fewer = [m for m in conversations if m in sample or conversations.index(m) % 2]
    assert held_out_conversations(write(tmp_path / "d.jsonl", fewer), max_conversations=10) == sample


def test_all_conversations_with_a_reply_are_kept_when_few(tmp_path):
    unanswered = [{"role": "user", "content": "Anyone?"}]
    rng = random.Random(1)
    conversations = [conversation(rng, turns=1), unanswered, conversation(rng, turns=2)]
    got = held_out_conversations(write(tmp_path / "t.jsonl", conversations), max_conversations=200)
    assert got == [conversations[0], conversations[2]]
