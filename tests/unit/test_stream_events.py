"""How a stream groups tokens into SSE events (pipelines/serve/responses.coalesced): a choice's first token goes
out at once, later ones in groups of serve.stream_interval, its last token never waits, text still pending
(bytes of a character) waits for the next event, and choices keep their own counts."""

from __future__ import annotations

import asyncio

from model.scheduler import RowUpdate
from model.sequence import StreamChunk
from pipelines.serve.responses import coalesced


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
