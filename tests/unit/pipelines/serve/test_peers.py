"""Handing a request to another model's deployment (pipelines/serve/peers.py), with a stand-in for its
DeploymentHandle: which deployment a request's `model` names, the other replica's refusal as the client's status
(also crossing a process: pickled), its stream relayed line by line, a failure mid-stream said in an error event,
and a client that leaves cancelling the stream there. Over Ray: tests/integration/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

from pipelines.serve.peers import call, relayed, served_name
from pipelines.serve.schemas import APIError, retry_after


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("quill-gpt-chat", "quill-gpt-chat"),
        ("models:/quill-gpt-chat/3", "quill-gpt-chat"),
        ("models:/quill-gpt-chat@champion", "quill-gpt-chat"),
        ("/srv/models/chat", "chat"),
        ("models:/", ""),
        ("", ""),
    ],
)
def test_a_requests_model_names_the_deployment_by_its_served_name(model, name):
    assert served_name(model) == name


def test_a_refusal_crosses_a_process_whole():
    err = APIError(429, "busy", None, "rate_limit_error", "server_busy", headers=retry_after())
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.body(), back.headers) == (429, err.body(), {"Retry-After": "1"})


class Lines:
    """What `handle.options(stream=True).remote(...)` gives: an async iterator of the other replica's items."""

    def __init__(self, items: list):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class Handle:
    """A DeploymentHandle's stand-in: records the method called, answers with `answer`."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def options(self, method_name: str, stream: bool = False):
        self.method = method_name
        return self

    def remote(self, *args):
        self.calls.append((self.method, args))
        if isinstance(self.answer, Lines):
            return self.answer
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.answer)
        return future


def test_an_answer_and_a_refusal_of_the_other_model():
    assert asyncio.run(call(Handle({"data": []}), "models")) == {"data": []}
    with pytest.raises(APIError) as err:
        asyncio.run(call(Handle(APIError(400, "no chat template", "model")), "chat_completion", "req"))
    assert (err.value.status, err.value.param) == (400, "model")


async def body(handle: Handle, leave_after: int | None = None) -> list[str]:
    response = await relayed(handle, "chat_completion", "req")
    out = []
    async for line in response.body_iterator:
        out.append(line)
        if len(out) == leave_after:
            await response.body_iterator.aclose()  # the client went away
            break
    return out


def test_a_stream_is_relayed_and_a_refusal_comes_before_it_as_a_status():
    events = ["data: {}\n\n", "data: {}\n\n", "data: [DONE]\n\n"]
    handle = Handle(Lines(events))
    assert asyncio.run(body(handle)) == events
    assert handle.calls == [("answer_stream", ("chat_completion", "req"))]
    with pytest.raises(APIError) as err:
        asyncio.run(body(Handle(Lines([APIError(429, "busy", None, "rate_limit_error")]))))
    assert err.value.status == 429


def test_a_failure_mid_stream_is_an_error_event_and_leaving_early_cancels_it_there():
    lines = asyncio.run(body(Handle(Lines(["data: {}\n\n", RuntimeError("replica died")]))))
    assert lines[-1] == "data: [DONE]\n\n"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "server_error"
    stream = Lines(["data: {}\n\n"] * 5)
    assert len(asyncio.run(body(Handle(stream), leave_after=2))) == 2
    assert stream.cancelled
