"""OpenAI's responses (pipelines/serve/responses.py): the engine client's exceptions as OpenAI's errors, a stream
that fails after its first event, and how a stream groups tokens into SSE events (`coalesced`): a choice's first
token goes out at once, later ones in groups of serve.stream_interval, its last token never waits, text still
pending (bytes of a character) waits for the next event, and choices keep their own counts."""

from __future__ import annotations

import asyncio
import json

import pytest

from model.scheduler import RowUpdate
from model.sequence import StreamChunk
from pipelines.serve.engine_client import Busy, Refused
from pipelines.serve.engine_process import EngineFailure, EngineStopped
from pipelines.serve.responses import coalesced, openai_error, sse


def events(batches: list[list[tuple[int, RowUpdate]]], interval: int) -> list[tuple[int, str, str | None]]:
    async def source():
        for b in batches:
            yield b

    async def collect():
        return [(i, text, finish) async for i, text, _, finish, _ in coalesced(source(), interval)]

    return asyncio.run(collect())


def tokens(choice: int, texts: list[str], finish_at_end: bool = True) -> list[list[tuple[int, RowUpdate]]]:
    """One batch per token (a decode step each), the last one finishing the choice."""
    out = []
    for k, text in enumerate(texts):
        finish = "length" if finish_at_end and k == len(texts) - 1 else None
        out.append([(choice, RowUpdate(choice, StreamChunk(k, text, finish)))])
    return out


def test_interval_one_sends_every_token_with_text():
    assert events(tokens(0, ["a", "b", "c"]), 1) == [(0, "a", None), (0, "b", None), (0, "c", "length")]


def test_the_first_token_goes_at_once_then_groups_of_the_interval_and_the_last_never_waits():
    got = events(tokens(0, list("abcdefgh")), 3)
    assert got == [(0, "a", None), (0, "bcd", None), (0, "efg", None), (0, "h", "length")]


def test_pending_bytes_wait_for_text_and_a_batch_of_several_tokens_is_one_event():
    batches = tokens(0, ["", "é", "x"])  # a character split over two tokens
    batches[2] = [(0, RowUpdate(0, StreamChunk(7, "y"))), (0, RowUpdate(0, StreamChunk(8, "z", "stop")))]
    assert events(batches, 1) == [(0, "é", None), (0, "yz", "stop")]


def test_choices_keep_their_own_counts():
    a, b = tokens(0, list("abcde")), tokens(1, list("vw"))
    interleaved = [a[0] + b[0], a[1] + b[1], *a[2:]]
    got = events(interleaved, 2)
    assert [e for e in got if e[0] == 1] == [(1, "v", None), (1, "w", "length")]
    assert [e for e in got if e[0] == 0] == [(0, "a", None), (0, "bc", None), (0, "de", "length")]


@pytest.mark.parametrize(
    ("exc", "status", "kind", "param"),
    [
        (Busy(64, 64), 429, "rate_limit_error", None),
        (Refused("max_tokens must be an integer >= 0, got -1"), 400, "invalid_request_error", "max_tokens"),
        (EngineStopped("the engine process stopped; the replica restarts"), 503, "server_error", None),
        (EngineFailure("generation failed: RuntimeError: boom"), 500, "server_error", None),
    ],
    ids=["busy", "refused", "stopped", "failed"],
)
def test_the_engine_clients_exceptions_are_openai_errors(exc, status, kind, param):
    err = openai_error(exc)
    assert (err.status, err.type, err.param) == (status, kind, param)
    assert err.message.startswith(str(exc))
    if status == 429:
        assert err.headers == {"Retry-After": "1"} and err.code == "server_busy" and "retry in 1 s" in err.message


def test_a_stream_that_fails_after_its_first_event_ends_with_an_error_event_and_done():
    async def events():
        yield {"choices": [{"text": "a"}]}
        raise EngineFailure("generation failed: the engine process stopped (exit code -9)")

    async def body():
        return [chunk async for chunk in sse(events()).body_iterator]

    sent = asyncio.run(body())
    assert json.loads(sent[0].removeprefix("data: ")) == {"choices": [{"text": "a"}]} and sent[-1] == "data: [DONE]\n\n"
    error = json.loads(sent[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "engine process stopped" in error["message"]
