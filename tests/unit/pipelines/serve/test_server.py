"""The replica's own handling of what its engine process sends, outside Ray: the deployment's class is called
directly (Ray Serve's ingress wrapper makes its constructor a coroutine) with a real engine process and a tiny
model. A fault injected into that handling fails the requests in flight with a server error, never leaves them
waiting, frees their KV-cache rows, and the replica serves on.

The OpenAPI document of the server (pipelines.serve.server.api, served as /openapi.json) says what it answers: each
route's statuses, every error in the one ErrorResponse shape (Retry-After on 429 and 503), text/event-stream
beside JSON for the completions routes, no 422 (an invalid body is answered 400); the bodies the handlers build
are the declared models, field for field; and past its bound on requests a replica sends the declared 503.
Without a server: tests/integration/test_serve.py runs schemathesis against the live one."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections.abc import Callable

import httpx
import jsonschema
import pytest
from fastapi import FastAPI

from model import Engine
from model.scheduler import RowUpdate
from model.sequence import Completion, StreamChunk, TokenLogprob
from pipelines.common.params import ServeParams
from pipelines.serve import deployment_options
from pipelines.serve.edge import EdgeGuard, install_error_handlers, max_in_flight
from pipelines.serve.engine_client import Busy, Refused
from pipelines.serve.engine_process import EngineFailure, EngineStopped
from pipelines.serve.openai_api import Translator
from pipelines.serve.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
    openai_error,
)
from pipelines.serve.schemas import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from pipelines.serve.server import QuillServer, api
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


# --- the OpenAPI document ---------------------------------------------------------------------------

GUARDED = {401, 413, 500, 503}  # the API key, the body size, the requests in flight; a fault
ANSWERS = {
    ("get", "/health"): {200, 404, 413, 500, 503},  # 404: ?model= names a model the app does not serve
    ("get", "/v1/models"): {200, *GUARDED},
    ("get", "/stats"): {200, 404, *GUARDED},
    ("get", "/tokenizer_info"): {200, 404, *GUARDED},
    ("post", "/tokenize"): {200, 400, 404, *GUARDED},
    ("post", "/detokenize"): {200, 400, 404, *GUARDED},
    ("post", "/v1/completions"): {200, 400, 404, 429, *GUARDED},
    ("post", "/v1/chat/completions"): {200, 400, 404, 429, *GUARDED},
}
ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(json.dumps(api.openapi()))  # as /openapi.json sends it


def operations(doc: dict):
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def schema_of(doc: dict, name: str) -> jsonschema.Draft202012Validator:
    """A validator of the document's component `name`, its references resolved within the document."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_each_route_declares_the_statuses_it_answers_and_no_422(doc):
    assert {(method, path): {int(s) for s in op["responses"]} for method, path, op in operations(doc)} == ANSWERS
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])


def test_every_error_status_declares_openai_error_shape_and_429_and_503_retry_after(doc):
    for method, path, op in operations(doc):
        for status, response in op["responses"].items():
            if status != "200":
                assert response["content"] == ERROR_CONTENT, (method, path, status)
                retry = response.get("headers", {}).get("Retry-After", {})
                assert retry.get("required", False) == (status in ("429", "503")), (method, path, status)


def test_the_completions_routes_declare_server_sent_events_beside_json(doc):
    for path, chunk, body in [
        ("/v1/completions", "CompletionResponse", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionChunk", "ChatCompletionResponse"),
    ]:
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}
        event = content["text/event-stream"]["schema"]
        done, data = event["properties"]["data"]["anyOf"]
        assert event["required"] == ["data"] and done == {"const": "[DONE]"}
        assert data["contentMediaType"] == "application/json"
        assert [s["$ref"].rsplit("/", 1)[1] for s in data["contentSchema"]["anyOf"]] == [chunk, "ErrorResponse"]


def test_every_reference_resolves(doc):
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert {"ErrorResponse", "ChatCompletionChunk"} <= refs <= set(doc["components"]["schemas"])


@pytest.mark.parametrize(
    "error",
    [
        APIError(400, "n must be <= 8, got 9", "n"),
        openai_error(Busy(4, 4)),
        openai_error(Refused("max_tokens must be ...")),
        openai_error(EngineStopped("the engine process stopped")),
        openai_error(EngineFailure("generation failed")),
    ],
    ids=lambda e: str(e.status),
)
def test_every_refusal_sends_the_declared_error_schema(doc, error):
    schema_of(doc, "ErrorResponse").validate(error.body())
    assert list(error.body()["error"]) == ["message", "type", "param", "code"]
    assert (error.headers or {}).get("Retry-After") == ("1" if error.status in (429, 503) else None)


def test_past_its_bound_on_requests_in_flight_a_replica_sends_the_declared_503(doc):
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(EdgeGuard, settings={"api_key_sha256": None, "max_body_bytes": 10_000, "max_in_flight": 1})

    async def main():
        started, release = asyncio.Event(), asyncio.Event()

        @app.get("/slow")
        async def slow():
            started.set()
            await release.wait()
            return {}

        @app.get("/health")
        async def health():
            return {}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://quill") as c:
            held = asyncio.create_task(c.get("/slow"))
            await started.wait()
            refused, health_ = await c.get("/slow"), await c.get("/health")
            release.set()
            return refused, health_, await held, await c.get("/slow")

    refused, health, held, after = asyncio.run(main())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    schema_of(doc, "ErrorResponse").validate(refused.json())
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert [health.status_code, held.status_code, after.status_code] == [200, 200, 200]  # /health aside; freed


def test_rays_bounds_sit_above_quills_so_every_refusal_is_quills():
    """Ray's refusal has a plain-text body: its queue is unbounded and its requests per replica exceed quill's."""
    p = ServeParams()
    options = deployment_options(p)
    assert options["max_queued_requests"] == -1
    assert options["max_ongoing_requests"] > max_in_flight(p) > p.max_ongoing_requests


# -- the bodies the handlers build are the declared models ----------------------------------------------------------


@pytest.fixture(scope="module")
def openai(tmp_path_factory) -> Translator:
    folder = tiny_model_folder(tmp_path_factory.mktemp("openapi"), seed=0)
    engine = Engine.from_pretrained(folder)
    info = (engine.config.block_size, engine.config.vocab_size, engine.eos_token_id)
    return Translator(folder, info, resolve(str(folder), "sqlite:///unused.db"), ServeParams())


def declared(model, body: dict) -> None:
    """`body` is valid for `model` and holds no field the model does not declare."""
    assert model.model_validate(body).model_dump(exclude_unset=True) == body


def done(prompt: list[int], ids: list[int], text: str) -> Completion:
    records = [TokenLogprob(t, "x", -1.0, [(t, "x", -1.0), (1, "y", -2.0)]) for t in ids]
    first = [TokenLogprob(prompt[0], "p", None)]
    prompt_records = first + [TokenLogprob(t, "p", -0.5, [(t, "p", -0.5)]) for t in prompt[1:]]
    return Completion(0, text, ids, "length", prompt, logprobs=records, prompt_logprobs=prompt_records)


async def steps(prompt: list[int]):
    yield [(0, RowUpdate(0, StreamChunk(5, "a", logprob=TokenLogprob(5, "a", -1.0, [(5, "a", -1.0)]))))]
    yield [(0, RowUpdate(0, StreamChunk(6, "b", "length", TokenLogprob(6, "b", -2.0)), done(prompt, [5, 6], "ab")))]


async def events(chunks) -> list[dict]:
    return [e async for e in chunks]


def test_completion_bodies_and_stream_events_are_the_declared_models(openai):
    req = CompletionRequest(prompt="To be", echo=True, logprobs=2, stream_options={"include_usage": True})
    prompts, _ = openai.completion_input(req)
    declared(CompletionResponse, openai.completion_body(req, prompts, [done(prompts[0], [5, 6], "ab")]))
    for event in asyncio.run(events(openai.completion_chunks(req, prompts, steps(prompts[0])))):
        declared(CompletionResponse, event)


def test_chat_bodies_and_stream_events_are_the_declared_models(openai):
    req = ChatRequest(
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=2,
        stream_options={"include_usage": True},
    )
    prompt, _ = openai.chat_input(req)
    declared(ChatCompletionResponse, openai.chat_body(req, prompt, [done(prompt, [5, 6], "ab")]))
    for event in asyncio.run(events(openai.chat_chunks(req, prompt, steps(prompt)))):
        declared(ChatCompletionChunk, event)


def test_the_other_routes_bodies_are_the_declared_models(openai):
    declared(ModelList, openai.models())
    declared(TokenizeResponse, openai.tokenize(TokenizeRequest(prompt="To be")))
    declared(DetokenizeResponse, openai.detokenize(DetokenizeRequest(tokens=[5, 6])))
    declared(TokenizerInfo, openai.tokenizer_info())
