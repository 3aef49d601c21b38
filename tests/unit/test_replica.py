"""The replica's own handling of what its engine process sends, outside Ray: the deployment's class is called
directly (Ray Serve's ingress wrapper makes its constructor a coroutine) with a real engine process and a tiny
model. A fault injected into that handling fails the requests in flight with a server error, never leaves them
waiting, frees their KV-cache rows, and the replica serves on."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict

import pytest

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
    await replica.__init__(asdict(resolve(str(folder), "sqlite:///unused.db")), "sqlite:///unused.db", {})
    return replica


def fail_once(replica, at_call: int) -> None:
    """The replica's step delivery raises on its at_call-th call, then works again."""
    real, calls = replica._deliver, []

    def deliver(*args):
        calls.append(1)
        if len(calls) == at_call:
            raise RuntimeError("injected fault")
        real(*args)

    replica._deliver = deliver


async def until_idle(replica, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (await replica.stats())["running"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def failed(replica) -> None:
    """Until the injected fault has failed every request in flight (the replica then forgets their queues)."""
    while replica._queues:
        await asyncio.sleep(0.01)


def long_request(**kw) -> CompletionRequest:
    return CompletionRequest(prompt="To be", max_tokens=LONG, temperature=0, ignore_eos=True, **kw)


def test_a_fault_handling_a_step_fails_the_requests_and_frees_their_rows(folder):
    async def scenario():
        replica = await start(folder)
        try:
            fail_once(replica, at_call=3)
            with pytest.raises(APIError) as err:
                await asyncio.wait_for(replica.completions(long_request()), 30)
            assert err.value.status == 500 and err.value.type == "server_error"
            assert "'step' message" in err.value.message
            await until_idle(replica)
            stats = await replica.stats()
            assert stats["running"] == 0 and stats["waiting"] == 0
            assert stats["generated_tokens"] < LONG / 2  # dropped by the engine, not run to its end

            # a stream that already sent tokens ends with an error event and [DONE], not a silent cut
            fail_once(replica, at_call=5)
            response = await replica.completions(long_request(stream=True))
            await asyncio.wait_for(failed(replica), 30)  # a slow client: tokens, then the failure, wait in its queue
            events = [e async for e in response.body_iterator]
            assert events[-1] == "data: [DONE]\n\n"
            last = json.loads(events[-2].removeprefix("data: "))
            assert last["error"]["type"] == "server_error", last
            assert any('"text"' in e for e in events[:-2])
            await until_idle(replica)

            # the replica serves on
            done = await replica.completions(CompletionRequest(prompt="To be", max_tokens=5, temperature=0))
            assert done["usage"]["completion_tokens"] == 5
            stats = await replica.stats()  # the memory of the actor and its engine process together
            assert 0 < stats["pss_bytes"] < stats["rss_bytes"]  # their shared libraries counted once in PSS
        finally:
            replica.engine_process.close()

    asyncio.run(scenario())


def test_an_unknown_engine_message_fails_what_is_in_flight_and_the_replica_serves_on(folder):
    async def scenario():
        replica = await start(folder)
        try:
            request = asyncio.ensure_future(replica.completions(long_request()))
            while not replica._queues:  # admitted
                await asyncio.sleep(0.01)
            replica._handle(("from a newer engine",))
            with pytest.raises(APIError) as err:
                await asyncio.wait_for(request, 30)
            assert err.value.status == 500
            await until_idle(replica)
            assert (await replica.stats())["generated_tokens"] < LONG / 2
            done = await replica.completions(CompletionRequest(prompt="To be", max_tokens=3, temperature=0))
            assert done["choices"][0]["finish_reason"] == "length"
        finally:
            replica.engine_process.close()

    asyncio.run(scenario())
