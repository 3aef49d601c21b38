"""The replica's own handling of what its engine process sends, outside Ray: the deployment's class is called
directly (Ray Serve's ingress wrapper makes its constructor a coroutine) with a real engine process and a tiny
model. A fault injected into that handling fails the requests in flight with a server error, never leaves them
waiting, frees their KV-cache rows, and the replica serves on."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable

import pytest

from pipelines.common.params import ServeParams
from pipelines.serve.schemas import APIError, CompletionRequest
from pipelines.serve.server import QuillServer
from pipelines.serve.source import resolve
from tests.helpers.serving import tiny_model_folder

LONG = 1000  # tokens: far more than the steps between a fault and the engine dropping the row


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("replica"), seed=0)


async def start(folder) -> QuillServer:
    cls = QuillServer.func_or_class
    replica = cls.__new__(cls)
    await replica.__init__(resolve(str(folder), "sqlite:///unused.db"), "sqlite:///unused.db", ServeParams())
    return replica


def fail_once(replica, at_call: int) -> None:
    """The replica's step delivery raises on its at_call-th call, then works again."""
    real, calls = replica.engine._deliver, []

    def deliver(*args):
        calls.append(1)
        if len(calls) == at_call:
            raise RuntimeError("injected fault")
        real(*args)

    replica.engine._deliver = deliver


class EngineWatch:
    """Installed on a replica: records each engine message the replica handled, and holds the engine back.

    From the first message `hold_after` matches, the replica's reader thread reads nothing more from the engine
    until the replica has sent a cancel; the engine, its pipe full, then waits too. So a request runs on for at
    most as many steps as the pipe holds past that message (~170 step messages with Linux's default 208 KiB
    socket buffer), however late the event loop gets to the message: the race becomes a sequence."""

    def __init__(self, replica, hold_after: Callable[[tuple], bool]):
        self.handled: list[tuple] = []  # (kind, updates, running, waiting) of each handled message, in order
        self.cancel_sent = threading.Event()
        self.hold_timed_out = False
        engine = replica.engine.process
        on_message, cancel, handle = engine._on_message, engine.cancel, replica.engine._handle
        held = False

        def read(msg: tuple) -> None:  # on the reader thread
            nonlocal held
            on_message(msg)
            if not held and hold_after(msg):
                held = True
                self.hold_timed_out = not self.cancel_sent.wait(20)  # then the engine runs on: a failure below

        def cancel_and_release(rids) -> None:
            cancel(rids)
            self.cancel_sent.set()

        def record(msg: tuple) -> None:  # on the event loop
            handle(msg)
            if msg[0] == "step":
                self.handled.append(("step", msg[1], msg[2], msg[3]))
            else:
                self.handled.append((msg[0], [], None, None))

        engine._on_message, engine.cancel, replica.engine._handle = read, cancel_and_release, record

    def engine_idle(self) -> bool:
        """The last message handled is a step after which the engine holds no row, running or waiting."""
        return bool(self.handled) and self.handled[-1][0] == "step" and self.handled[-1][2:] == (0, 0)

    def completed(self) -> list:
        """Every update that ended its request (the engine ran it to its end)."""
        return [u for kind, updates, _, _ in self.handled if kind == "step" for u in updates if u.completion]


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll `check` on the event loop until it holds; AssertionError naming `what` at the timeout."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what}")
        await asyncio.sleep(0.01)


def nth_step(n: int) -> Callable[[tuple], bool]:
    """Matches the engine's n-th step message."""
    steps = itertools.count(1)
    return lambda msg: msg[0] == "step" and next(steps) == n


def long_request(**kw) -> CompletionRequest:
    return CompletionRequest(prompt="To be", max_tokens=LONG, temperature=0, ignore_eos=True, **kw)


def test_a_fault_handling_a_step_fails_the_requests_and_frees_their_rows(folder):
    async def scenario():
        replica = await start(folder)
        try:
            fail_once(replica, at_call=3)
            watch = EngineWatch(replica, hold_after=nth_step(3))  # the engine waits from the faulty step on
            with pytest.raises(APIError) as err:
                await asyncio.wait_for(replica.completions(long_request()), 30)
            assert err.value.status == 500 and err.value.type == "server_error"
            assert "'step' message" in err.value.message
            await wait_until(watch.engine_idle, "the engine to report no rows after the fault")
            assert not watch.hold_timed_out, "the replica sent no cancel after the fault"
            stats = await replica.stats()
            assert stats["running"] == 0 and stats["waiting"] == 0
            assert watch.completed() == []  # dropped by the engine, not run to its end ...
            assert stats["generated_tokens"] < LONG / 2  # ... but soon after the fault

            # a stream that already sent tokens ends with an error event and [DONE], not a silent cut
            fail_once(replica, at_call=5)
            response = await replica.completions(long_request(stream=True))
            # a slow client: tokens, then the failure, wait in its queue (the replica then forgets the queues)
            await wait_until(lambda: not replica.engine._queues, "the fault to fail the stream")
            events = [e async for e in response.body_iterator]
            assert events[-1] == "data: [DONE]\n\n"
            last = json.loads(events[-2].removeprefix("data: "))
            assert last["error"]["type"] == "server_error", last
            assert any('"text"' in e for e in events[:-2])
            await wait_until(watch.engine_idle, "the engine to report no rows after the stream's fault")

            # the replica serves on
            done = await replica.completions(CompletionRequest(prompt="To be", max_tokens=5, temperature=0))
            assert done["usage"]["completion_tokens"] == 5
            stats = await replica.stats()  # the memory of the actor and its engine process together
            assert 0 < stats["pss_bytes"] < stats["rss_bytes"]  # their shared libraries counted once in PSS
        finally:
            replica.engine.close()

    asyncio.run(scenario())


def test_an_unknown_engine_message_fails_what_is_in_flight_and_the_replica_serves_on(folder):
    async def scenario():
        replica = await start(folder)
        try:
            # the engine waits from its answer to the add until the replica cancels the request
            watch = EngineWatch(replica, hold_after=lambda msg: msg[0] == "added")
            request = asyncio.ensure_future(replica.completions(long_request()))
            await wait_until(lambda: replica.engine._queues, "the request to be admitted")
            replica.engine._handle(("from a newer engine",))
            with pytest.raises(APIError) as err:
                await asyncio.wait_for(request, 30)
            assert err.value.status == 500
            await wait_until(watch.engine_idle, "the engine to report no rows after the unknown message")
            assert not watch.hold_timed_out, "the replica sent no cancel after the unknown message"
            assert watch.completed() == []  # dropped by the engine, not run to its end
            assert (await replica.stats())["generated_tokens"] < LONG / 2
            done = await replica.completions(CompletionRequest(prompt="To be", max_tokens=3, temperature=0))
            assert done["choices"][0]["finish_reason"] == "length"
        finally:
            replica.engine.close()

    asyncio.run(scenario())
