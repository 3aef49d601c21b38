"""The app's other models: the ingress replica (the base model's) answers its own model's requests itself, and hands
a request for another model (the chat model) to that model's deployment through its DeploymentHandle.

    served_name("models:/quill-gpt-chat/3")     # -> "quill-gpt-chat": the deployment a request's `model` picks
    body = await call(handle, "models")         # that deployment's QuillServer.models(), its refusals raised here
    response = await relayed(handle, "chat_completion", req)   # a stream: its events, relayed as they come

A refusal (400, 404, 429, 503) comes back as a value, the APIError itself, not as an exception: Ray wraps what a
replica raises in its own error types, and the client must get the other model's status and body unchanged. A
stream's refusal comes before its first event, so it is still a status line.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import PurePosixPath

from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from pipelines.serve.responses import event_stream, stream_failure
from pipelines.serve.schemas import APIError

REGISTRY = "models:/"


def served_name(model: str) -> str:
    """The served name a request's `model` refers to: a registry URI's model name, a local folder's name.

    >>> served_name("models:/quill-gpt/3"), served_name("models:/quill-gpt@champion"), served_name("/srv/chat")
    ('quill-gpt', 'quill-gpt', 'chat')
    """
    if model.startswith(REGISTRY):
        return model.removeprefix(REGISTRY).split("/")[0].split("@")[0]
    return PurePosixPath(model).name if "/" in model else model


async def call(handle: DeploymentHandle, method: str, *args):
    """`method` of the model behind `handle` (QuillServer.answer); what it refuses is raised here."""
    out = await handle.options(method_name="answer").remote(method, *args)
    if isinstance(out, APIError):
        raise out
    return out


async def relayed(handle: DeploymentHandle, method: str, req) -> StreamingResponse:
    """The stream `method` of the model behind `handle` answers `req` with (QuillServer.answer_stream), relayed line
    by line; a refusal before its first event is raised here, and leaving early cancels it there."""
    lines = handle.options(method_name="answer_stream", stream=True).remote(method, req)
    first = await anext(lines)
    if isinstance(first, APIError):
        raise first
    return event_stream(_relay(first, lines))


async def _relay(first: str, lines) -> AsyncIterator[str]:
    done = False
    try:
        yield first
        async for line in lines:
            yield line
        done = True
    except Exception as exc:  # the other model's replica went away mid-stream: said, never a silent cut
        yield f"data: {json.dumps(stream_failure(exc).body())}\n\n"
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:  # the client left: the other replica cancels the request in its engine
            lines.cancel()
