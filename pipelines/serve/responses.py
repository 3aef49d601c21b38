"""OpenAI's response shapes: usage, logprobs in the completions and the chat format, the engine's failures as
OpenAI's errors, and server-sent events (how a stream groups its tokens into events, and how it ends); at the end,
the same shapes as pydantic models, which the OpenAPI document declares (schemas.documented)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Literal

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from model.scheduler import RowUpdate
from model.sequence import Completion, TokenLogprob
from pipelines.serve import metrics
from pipelines.serve.engine_client import Busy, Refused
from pipelines.serve.engine_process import EngineFailure, EngineStopped
from pipelines.serve.schemas import RETRY_AFTER_S, APIError, retry_after

ENGINE_ERRORS = (Busy, Refused, EngineFailure)  # what the engine client raises for a request


def param_of(message: str) -> str | None:
    """The parameter a model-layer ValueError names first ("max_tokens must be ...", "prompt (12 tokens) ...")."""
    word = message.split(" ", 1)[0]
    return word if word.isidentifier() else None


def openai_error(exc: Busy | Refused | EngineFailure) -> APIError:
    """An engine client's exception in OpenAI's shape: 429 with Retry-After for a full replica, 400 naming the
    parameter for what the scheduler refuses, 503 with Retry-After once the engine process is gone (Ray replaces
    the replica), 500 for a failure."""
    if isinstance(exc, Busy):
        message = f"{exc}; retry in {RETRY_AFTER_S} s"
        return APIError(429, message, None, "rate_limit_error", "server_busy", headers=retry_after())
    if isinstance(exc, Refused):
        return APIError(400, str(exc), param_of(str(exc)))
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), None, "server_error", headers=retry_after())
    return APIError(500, str(exc), None, "server_error")


@contextmanager
def engine_errors() -> Iterator[None]:
    """Raises what the engine client raises inside as OpenAI's errors (openai_error)."""
    try:
        yield
    except ENGINE_ERRORS as exc:
        raise openai_error(exc) from None


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """A stream's events as a text/event-stream response (sse_lines)."""
    return event_stream(sse_lines(events))


def event_stream(lines: AsyncIterator[str]) -> StreamingResponse:
    """A text/event-stream response of sse_lines' lines (this replica's, or relayed from another model's)."""
    return StreamingResponse(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def sse_lines(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format, ending with [DONE]; a failure after the first event is sent as
    an error event (the status line is already out), never as a silent cut."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except ENGINE_ERRORS as exc:  # the engine failed mid-stream: its reason, named
        yield f"data: {json.dumps(openai_error(exc).body())}\n\n"
    except Exception as exc:  # a fault of ours mid-stream
        metrics.ERRORS.inc(tags={"kind": "stream"})
        yield f"data: {json.dumps(stream_failure(exc).body())}\n\n"
    yield "data: [DONE]\n\n"


def stream_failure(exc: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(exc).__name__}", None, "server_error")


def usage(prompts: list[list[int]], done: list[Completion]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in done)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def legacy_records(recs: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's completions logprobs: parallel lists of tokens, their logprobs, top alternatives, text offsets."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for r in recs:
        out["tokens"].append(r.token)
        out["token_logprobs"].append(r.logprob)
        out["top_logprobs"].append({t: lp for _, t, lp in r.top} if r.logprob is not None else None)
        out["text_offset"].append(offset)
        offset += len(r.token)
    return out


def legacy_logprobs(c: Completion, echo: bool) -> dict:
    recs = (c.prompt_logprobs or [] if echo else []) + (c.logprobs or [])
    return legacy_records(recs, 0)


def chat_logprobs(recs: list[TokenLogprob] | None) -> dict:
    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for _, t, lp in r.top]} for r in recs or []
        ]
    }


async def coalesced(batches: AsyncIterator[list[tuple[int, RowUpdate]]], interval: int = 1):
    """(choice index, text, logprob records, finish_reason, completion) per choice with something to send:
    every token a batch holds for a choice goes into one event (OpenAI clients take multi-token deltas). Tokens
    whose text is still pending (bytes of a character, a possible stop string) wait, with their logprobs, for
    the next event of their choice; after a choice's first event, its tokens also wait until `interval` of them
    are pending (its last token never waits)."""
    pending: dict[int, list[RowUpdate]] = {}
    started: set[int] = set()
    async for batch in batches:
        ready: list[int] = []
        for i, u in batch:
            ups = pending.setdefault(i, [])
            ups.append(u)
            done = u.chunk.finish_reason is not None
            due = i not in started or len(ups) >= interval
            if (done or (u.chunk.text and due)) and i not in ready:
                ready.append(i)
        for i in ready:
            started.add(i)
            ups = pending.pop(i)
            text = "".join(u.chunk.text for u in ups)
            recs = [u.chunk.logprob for u in ups if u.chunk.logprob is not None]
            yield i, text, recs, ups[-1].chunk.finish_reason, ups[-1].completion


# -- the shapes above as the OpenAPI document declares them (the handlers build dicts; these are not run) -------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Meta(BaseModel):
    """What a completion, a chat completion and every event of their streams begin with."""

    id: str
    created: int
    model: str
    system_fingerprint: str


FinishReason = Literal["stop", "length"] | None  # None in a stream's events before a choice's last


class CompletionLogprobs(BaseModel):
    """Parallel lists, one entry per token (an echoed prompt's first token has no logprob)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class CompletionResponse(Meta):
    """A completion, and each event of a completions stream (the last has only `usage`, when asked for)."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(Meta):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # the first event's
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionChunk(Meta):
    """An event of a chat stream: the role first, then the content; the last has only `usage`, when asked for."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    version: str  # the registry version, or "local"
    uri: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    eos_token: str | None
    bos_token: None
    pad_token: str | None
    model_max_length: int


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    version: str
