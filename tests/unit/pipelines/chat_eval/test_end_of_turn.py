"""pipelines/chat_eval/end_of_turn.py: the end-of-turn rate of a model that always closes its turn, one that cannot,
and one that stops with end-of-text instead; prompts end where the last reply begins; seeded responses do not
depend on what else is decoded beside them."""

from __future__ import annotations

import random

import pytest
import torch

from model import GPT, Engine, SamplingParams
from model.chat import chat_markers, encode_chat, literal
from pipelines.chat_eval.end_of_turn import eot_rate, generation_rows, prompt_ids, respond
from tests.helpers.chat import CHAT, conversation
from tests.helpers.corpus import WORDS
from tests.helpers.models import tiny
from tests.helpers.tokenizers import byte_bpe


@pytest.fixture(scope="module")
def engine() -> Engine:
    tokenizer = byte_bpe([" ".join(WORDS)] * 4)
    torch.manual_seed(0)
    return Engine(GPT(tiny(vocab_size=tokenizer.get_vocab_size(), block_size=96)), tokenizer, eos_token_id=0)


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    rng = random.Random(0)
    conversations = [conversation(rng, turns=1 + i % 2) for i in range(4)]
    return prompt_ids(literal(engine.tokenizer), conversations, keep=engine.config.block_size - 8)


@pytest.mark.parametrize(
    ("bias", "rate", "finish"),
    [
        ({"im_end": 100}, 1.0, "stop"),  # always closes its turn, at the first token
        ({"im_end": -100, "eos": -100}, 0.0, "length"),  # can never stop: runs to max_tokens
        ({"eos": 100}, 0.0, "stop"),  # stops, but with end-of-text: not the turn's end
    ],
)
def test_the_rate_counts_responses_that_close_with_im_end(engine, prompts, bias, rate, finish):
    _, im_end = chat_markers(engine.tokenizer)
    ids = {"im_end": im_end, "eos": engine.eos_token_id}
    params = SamplingParams(
        max_tokens=8, temperature=0.7, stop_token_ids=[im_end], logit_bias={ids[k]: v for k, v in bias.items()}
    )
    replies = respond(engine, prompts, params, seed=3, rows=4)
    assert eot_rate(replies, im_end) == rate
    assert {r.finish_reason for r in replies} == {finish}
    assert all(len(r.token_ids) == (8 if finish == "length" else 1) for r in replies)


def test_seeded_responses_do_not_depend_on_the_batch(engine, prompts):
    _, im_end = chat_markers(engine.tokenizer)
    params = SamplingParams(max_tokens=8, temperature=0.7, stop_token_ids=[im_end])
    alone = [respond(engine, [p], params, seed=5 + i, rows=1)[0].token_ids for i, p in enumerate(prompts)]
    together = [r.token_ids for r in respond(engine, prompts, params, seed=5, rows=4)]
    assert together == alone


def test_the_prompt_is_the_conversation_before_its_last_reply_truncated_from_the_left(engine):
    tokenizer = literal(engine.tokenizer)
    [whole] = prompt_ids(tokenizer, [CHAT], keep=10_000)
    assert whole == encode_chat(tokenizer, CHAT[:-1], add_generation_prompt=True).ids
    [cut] = prompt_ids(tokenizer, [CHAT], keep=12)
    assert cut == whole[-12:]


def test_a_long_context_base_decodes_fewer_rows_at_once():
    assert generation_rows(tiny(block_size=64)) == 64
    assert 1 <= generation_rows(tiny(block_size=8192, n_layer=30, n_embd=576, n_head=9, n_kv_head=3)) < 8
