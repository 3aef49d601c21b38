"""The OpenAI request bodies the server accepts (pydantic, at the edge), the OpenAI error shape, and what the
OpenAPI document (/openapi.json) declares each route answers (`documented`; the bodies' shapes: responses.py).

Field names, types and ranges follow OpenAI's API and vLLM's extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos). Unknown fields are rejected (OpenAI answers 400 for them). Server caps
(max_tokens, n, logprobs, stop sequences) are checked in `check_caps`, since they come from params.yaml.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator
from pydantic.json_schema import models_json_schema

from pipelines.common.params import ServeParams

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
Text = Annotated[str, Field(min_length=1)]
Prompt = Annotated[TokenIds, Field(min_length=1)]  # one prompt's token ids
Number = StrictFloat  # a JSON number (an integer too), never a boolean or a string
MAX_LOGIT_BIAS = 300  # entries in logit_bias, as OpenAI allows
MAX_STOP_TOKEN_IDS = 256  # ids in stop_token_ids: each is checked against every generated token
RETRY_AFTER_S = 1  # what a client refused with 429 or 503 waits before retrying
# the smallest temperature (but 0, greedy) and repetition_penalty sampled: logits divided by less overflow to inf
MIN_DIVISOR = 0.01
MAX_TOP_K = 2**31 - 1  # more than any vocabulary (a larger top_k keeps every token, as this does)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None = the served model
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # None = serve.default_max_tokens
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0  # under MIN_DIVISOR: sampled at it, as vLLM does
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: Text | list[Text] | None = Field(default=None, validate_default=True)  # always a list after validation
    seed: StrictInt | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: (  # token id (digits) -> bias
        Annotated[
            dict[Annotated[str, Field(pattern="^[0-9]+$")], Annotated[Number, Field(ge=-100, le=100)]],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] = 0
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[Number, Field(ge=MIN_DIVISOR, le=10)] = 1.0
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: StrictBool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_not_empty(cls, v):  # before the union's own errors, which name its branches
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        return [v] if isinstance(v, str) else (v or [])

    @field_validator("temperature")
    @classmethod
    def _finite_logits(cls, v):
        return v if v == 0 else max(v, MIN_DIVISOR)


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | Prompt | Annotated[list[Prompt], Field(min_length=1)]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    suffix: None = None  # not supported: only null is accepted
    best_of: Annotated[StrictInt, Field(ge=1, le=1)] | None = None  # 1 only: no server-side best-of

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_not_empty(cls, v):  # before the union's own errors, which name its branches
        if v in ("", []) or (isinstance(v, list) and any(p in ("", []) for p in v)):
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: TokenIds


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, rate_limit_error, server_error
    param: str | None  # the request's parameter at fault
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every refusal and failure is answered with it."""

    error: ErrorDetail


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def __reduce__(self):  # pickled whole: another model's deployment hands it to the ingress (peers.py)
        return APIError, (self.status, self.message, self.param, self.type, self.code, self.headers)

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


def retry_after() -> dict[str, str]:
    """The header of every 429 and 503."""
    return {"Retry-After": str(RETRY_AFTER_S)}


# -- the OpenAPI document: each route's `documented(...)` says what it answers -----------------------------------
REF = "#/components/schemas/"
RETRY_HEADER = {"description": "seconds to wait", "required": True, "schema": {"type": "integer", "minimum": 0}}
ERRORS = {
    400: "malformed JSON, a body that is not UTF-8, an unknown field, a value out of range or past a server cap, "
    "a chat with a model that has no chat template",
    401: "no or a wrong `Authorization: Bearer <key>`, when the server has an API key (QUILL_API_KEY)",
    404: "a model this server does not serve",
    413: "a body over serve.max_body_bytes",
    429: "the replica holds serve.max_ongoing_requests sequences (running and waiting; `n` counts n times)",
    500: "a fault of the server",
    503: "the replica's engine process stopped (Ray replaces the replica), or the replica holds "
    "serve.max_ongoing_requests + serve.max_queued_requests HTTP requests",
}
ERROR_RESPONSES: dict[int, dict] = {
    status: {"model": ErrorResponse, "description": text}
    | ({"headers": {"Retry-After": RETRY_HEADER}} if status in (429, 503) else {})
    for status, text in ERRORS.items()
}
GUARDED = (401, 413, 503, 500)  # every route but /health (edge.EdgeGuard: API key, body size, requests in flight)


def documented(ok: type[BaseModel] | None, *errors: int, stream: type[BaseModel] | None = None) -> dict:
    """A route decorator's response declarations: 200 with `ok`'s JSON (and, for `stream: true`, events of `stream`
    as text/event-stream), and OpenAI's error shape for each status of `errors`. Handlers return dicts
    (response_model=None): the shapes are documented, not validated again on the way out."""
    responses: dict = {status: ERROR_RESPONSES[status] for status in sorted(errors)}
    if ok is not None:
        responses[200] = {"model": ok}
    if stream is not None:
        responses[200]["content"] = {"text/event-stream": {"schema": sse_event(stream)}}
    return {"response_model": None, "responses": responses}


def sse_event(chunk: type[BaseModel]) -> dict:
    """One event of a stream (OpenAPI 3.1: the schema of text/event-stream is each event's): its `data` is a
    chunk, OpenAI's error (a failure after the status line went out), or the last event's [DONE]."""
    payload = {"anyOf": [{"$ref": REF + chunk.__name__}, {"$ref": REF + ErrorResponse.__name__}]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def complete_document(doc: dict, chunks: tuple[type[BaseModel], ...]) -> dict:
    """FastAPI's OpenAPI document made true to this server: no 422 (an invalid body is answered 400, see
    edge.install_error_handlers), and the schemas of the streams' `chunks` that `sse_event` refers to."""
    for operations in doc["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _, events = models_json_schema([(m, "serialization") for m in chunks], ref_template=REF + "{model}")
    schemas.update(events.get("$defs", {}))
    return doc


def check_caps(req: SamplingFields, limits: ServeParams) -> None:
    """The server's caps from params.yaml: 400 naming the parameter."""
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise APIError(400, f"max_tokens must be <= {limits.max_tokens_cap}, got {max_tokens}", "max_tokens")
    if req.n > limits.max_n:
        raise APIError(400, f"n must be <= {limits.max_n}, got {req.n}", "n")
    if req.n > 1 and req.stream:
        raise APIError(400, "n > 1 is not supported with stream", "n")
    if len(req.stop) > limits.max_stop_sequences:
        raise APIError(400, f"at most {limits.max_stop_sequences} stop sequences, got {len(req.stop)}", "stop")
    if any(len(s) > limits.max_stop_chars for s in req.stop):
        raise APIError(400, f"stop sequences must be at most {limits.max_stop_chars} characters", "stop")
    n_logprobs = req.top_logprobs if isinstance(req, ChatRequest) else req.logprobs
    if n_logprobs is not None and n_logprobs > limits.max_logprobs:
        param = "top_logprobs" if isinstance(req, ChatRequest) else "logprobs"
        raise APIError(400, f"{param} must be <= {limits.max_logprobs}, got {n_logprobs}", param)


def short(value, quoted: bool = True) -> str:
    """What a client sent, quoted back in an error at most 80 characters long, escaped as JSON."""
    text = json.dumps(value, default=str) if quoted else json.dumps(str(value))[1:-1]
    return text if len(text) <= 80 else text[:77] + "..."
