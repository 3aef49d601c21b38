"""The end-of-turn rate: does a model close its reply with <|im_end|>, or ramble on until it is cut off?

    >>> replies = respond(engine, prompt_ids(tokenizer, conversations, keep), SamplingParams(...), seed, rows=16)
    >>> eot_rate(replies, im_end)
    0.94

Each conversation is asked for its last reply: the prompt is the messages before its last assistant turn plus the
generation prompt (`<|im_start|>assistant\\n`), and a response is sampled (seeded per conversation: the same
conversation gets the same random stream under both models) until <|im_end|>, end-of-text or max_tokens. The rate
is the share of responses whose last token is <|im_end|>: a model that ends with end-of-text, or not at all within
max_tokens, did not close its turn the way serving expects.

Generation is continuous batching (model.Scheduler): a finished response frees its row for the next prompt at once,
so a model that stops early costs only the tokens it writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from tokenizers import Tokenizer

from model import Completion, Engine, GPTConfig, SamplingParams, Scheduler
from model.chat import encode_chat

MAX_ROWS = 64  # responses decoded together at most; a CPU gains little from more
KV_BUDGET = 1 << 30  # bytes of KV cache for generation: the scheduler's rows and the prefill's scratch rows


def last_reply(messages: Sequence[dict]) -> int:
    """The index of the conversation's last assistant message."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def prompt_ids(tokenizer: Tokenizer, conversations: Sequence[Sequence[dict]], keep: int) -> list[list[int]]:
    """Each conversation up to its last reply, ready for the assistant to answer (tokenizer: model.chat.literal's).
    A prompt longer than `keep` tokens (the context left after max_tokens) is truncated from the left: it keeps the
    most recent `keep` tokens, so the model sees the turns closest to its reply."""
    return [encode_chat(tokenizer, m[: last_reply(m)], add_generation_prompt=True).ids[-keep:] for m in conversations]


def generation_rows(config: GPTConfig) -> int:
    """How many responses to decode together: MAX_ROWS, fewer when the model's KV cache (block_size slots a row,
    float32, held twice: the scheduler's and the prefill's) would pass KV_BUDGET (a long-context base)."""
    per_row = 2 * 2 * config.n_layer * config.n_kv_head * config.block_size * config.head_dim * 4
    return max(1, min(MAX_ROWS, KV_BUDGET // per_row))


def respond(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seed: int,
    rows: int,
    progress: Callable[[int], None] | None = None,
) -> list[Completion]:
    """One sampled response per prompt, in order; prompt i draws with seed + i. rows: responses decoded together.
    progress(n), if given, is called with the number of responses that finished in each step."""
    scheduler = Scheduler(engine, max_batch_size=rows, max_prefill_tokens=rows * engine.config.block_size)
    rids = [scheduler.add(list(p), replace(params, seed=seed + i)) for i, p in enumerate(prompts)]
    done: dict[int, Completion] = {}
    while scheduler.has_work():
        finished = [u for u in scheduler.step() if u.completion is not None]
        done.update((u.rid, u.completion) for u in finished)
        if progress is not None and finished:
            progress(len(finished))
    return [done[rid] for rid in rids]


def ended(completion: Completion, im_end: int) -> bool:
    """Whether the response closed its turn: its last token is <|im_end|>."""
    return completion.finish_reason == "stop" and completion.token_ids[-1:] == [im_end]


def eot_rate(completions: Sequence[Completion], im_end: int) -> float:
    """The share of responses that end with <|im_end|>."""
    return sum(ended(c, im_end) for c in completions) / max(len(completions), 1)
