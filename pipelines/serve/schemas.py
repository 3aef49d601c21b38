"""The OpenAI request bodies the server accepts (pydantic, at the edge) and the OpenAI error shape.

Field names, types and ranges follow OpenAI's API and vLLM's extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos). Unknown fields are rejected (OpenAI answers 400 for them). Server caps
(max_tokens, n, logprobs, stop sequences) are checked in `check_caps`, since they come from params.yaml.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from pipelines.common.params import ServeParams

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
MAX_LOGIT_BIAS = 300  # entries in logit_bias, as OpenAI allows
MAX_STOP_TOKEN_IDS = 256  # ids in stop_token_ids: each is checked against every generated token


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None = the served model
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # None = serve.default_max_tokens
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: str | list[str] | None = Field(default=None, validate_default=True)  # always a list after validation
    seed: StrictInt | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)] | None
    ) = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        if v is not None and not all(k.isdigit() for k in v):
            raise ValueError("logit_bias keys must be token ids (strings of digits)")
        return v


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    suffix: None = None  # not supported: only null is accepted
    best_of: Literal[1] | None = None


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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
