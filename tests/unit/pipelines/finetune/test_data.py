"""pipelines/finetune/data.py: conversations to windows with the assistant-only loss mask, padding that is never a target, batches."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from model.chat import IM_END, encode_chat, literal
from pipelines.common.training.lit import Optimization
from pipelines.finetune.data import IGNORE, Encoded, collate, encode_conversation, pad_id, sample_indices
from pipelines.finetune.lit_chat import LitChat
from tests.helpers.chat import CHAT
from tests.helpers.tokenizers import byte_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return literal(byte_bpe(["Who is there? Nay, answer me: stand, and unfold yourself. Long live the king!"] * 8))


def test_only_the_assistants_tokens_and_its_im_end_are_targets(tokenizer):
    tally = Encoded()
    encode_conversation(tokenizer, CHAT, 256, tally)
    [window] = tally.windows
    targets = [t for t in window.targets if t != IGNORE]
    # a user or system token in the loss adds its text; an <|im_end|> left out loses the model its stop
    assert tokenizer.decode(targets, skip_special_tokens=False) == f"Nay, answer me.{IM_END}Bernardo?{IM_END}"
    im_end = tokenizer.token_to_id(IM_END)
    assert targets.count(im_end) == 2
    # targets are the next tokens of the inputs, and the window stops at the last one learnt
    full = encode_chat(tokenizer, CHAT, add_generation_prompt=False).ids
    assert window.inputs == full[: len(window.inputs)] and window.targets[-1] == im_end


def test_the_loss_averages_over_the_targets_alone(tokenizer):
    tally = Encoded()
    for messages in (CHAT, CHAT[1:3]):
        encode_conversation(tokenizer, messages, 256, tally)
    x, y = collate(tally.windows, pad=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), block_size=256))
    lit = LitChat(model, Optimization(lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0), 10, wrapped=False)
    loss = lit.batch_loss((x, y))
    logits, _ = model(x)
    kept = y != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[kept], y[kept])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # changing what the user said (an input, never a target) changes no target
    assert int(kept.sum()) == sum(t != IGNORE for w in tally.windows for t in w.targets)


def test_padding_is_never_im_end_nor_a_target_and_changes_no_logit(tokenizer):
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    pad = pad_id(tokenizer, pad_token=IM_END)  # a base whose own pad token is <|im_end|> (SmolLM2's)
    assert pad not in (vocab[IM_END], vocab["<|im_start|>"])
    tally = Encoded()
    for messages in (CHAT[1:3], CHAT):
        encode_conversation(tokenizer, messages, 256, tally)
    short = tally.windows[0]
    x, y = collate(tally.windows, pad)
    n = len(short.inputs)
    assert (x[0, n:] == pad).all() and (y[0, n:] == IGNORE).all() and n < x.shape[1]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), block_size=256)).eval()
    with torch.no_grad():
        padded, _ = model(x)
        alone, _ = model(torch.tensor([short.inputs]))
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=0)


def test_long_conversations_become_windows_and_what_cannot_fit_is_counted(tokenizer):
    tally = Encoded()
    long_chat = CHAT[:1] + CHAT[1:5] * 6  # twelve exchanges after a system prompt
    encode_conversation(tokenizer, long_chat, 64, tally)
    assert len(tally.windows) > 1 and tally.split_conversations == 1
    system = encode_chat(tokenizer, CHAT[:1], add_generation_prompt=False).ids
    for w in tally.windows:
        assert len(w.inputs) <= 64 and w.inputs[: len(system)] == system  # every window keeps the system prompt
    exchanges = sum(t == tokenizer.token_to_id(IM_END) for w in tally.windows for t in w.targets)
    assert exchanges == 12  # no exchange lost or repeated
    encode_conversation(tokenizer, [CHAT[1], {"role": "assistant", "content": "word " * 200}], 64, tally)
    encode_conversation(tokenizer, [CHAT[1], CHAT[3]], 64, tally)  # nobody answers: nothing to learn
    summary = tally.summary()
    assert summary["dropped"] == {"too_long": 1, "empty_mask": 1}
    assert summary["conversations"] == 3 and summary["windows"] == len(tally.windows)


def test_batches_are_a_pure_function_of_the_micro_batch_and_cover_each_epoch():
    first = [i for k in range(5) for i in sample_indices(20, 4, seed=3, k=k)]
    assert sorted(first) == list(range(20))  # one epoch: every window once
    assert sample_indices(20, 4, 3, 7) == sample_indices(20, 4, 3, 7) != sample_indices(20, 4, 4, 7)
