"""OpenAI's response shapes: usage, logprobs in the completions and the chat format, the engine's failures as
OpenAI's errors, and server-sent events (how a stream groups its tokens into events, and how it ends)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from fastapi.responses import StreamingResponse

from model.scheduler import RowUpdate
from model.sequence import Completion, TokenLogprob
from pipelines.serve import metrics
from pipelines.serve.engine_client import Busy, Refused
from pipelines.serve.engine_process import EngineFailure, EngineStopped
from pipelines.serve.schemas import APIError

RETRY_AFTER_S = 1  # what a client refused with 429 waits before retrying
ENGINE_ERRORS = (Busy, Refused, EngineFailure)  # what the engine client raises for a request


def param_of(message: str) -> str | None:
    """The parameter a model-layer ValueError names first ("max_tokens must be ...", "prompt (12 tokens) ...")."""
    word = message.split(" ", 1)[0]
    return word if word.isidentifier() else None


def openai_error(exc: Busy | Refused | EngineFailure) -> APIError:
    """An engine client's exception in OpenAI's shape: 429 with Retry-After for a full replica, 400 naming the
    parameter for what the scheduler refuses, 503 once the engine process is gone, 500 for a failure."""
    if isinstance(exc, Busy):
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        message = f"{exc}; retry in {RETRY_AFTER_S} s"
        return APIError(429, message, None, "rate_limit_error", "server_busy", headers=retry)
    if isinstance(exc, Refused):
        return APIError(400, str(exc), param_of(str(exc)))
    return APIError(503 if isinstance(exc, EngineStopped) else 500, str(exc), None, "server_error")


@contextmanager
def engine_errors() -> Iterator[None]:
    """Raises what the engine client raises inside as OpenAI's errors (openai_error)."""
    try:
        yield
    except ENGINE_ERRORS as exc:
        raise openai_error(exc) from None


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events in OpenAI's format, ending with [DONE]; a failure after the first event is sent as
    an error event (the status line is already out), never as a silent cut."""

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except ENGINE_ERRORS as exc:  # the engine failed mid-stream: its reason, named
            yield f"data: {json.dumps(openai_error(exc).body())}\n\n"
        except Exception as exc:  # a fault of ours mid-stream
            metrics.ERRORS.inc(tags={"kind": "stream"})
            err = APIError(500, f"generation failed: {type(exc).__name__}", None, "server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
