"""One served model's replica: its engine process, the OpenAI layer over it, and what it answers, HTTP aside.

    replica = ModelReplica(source, tracking_uri, serve_params, served=("quill-gpt", "quill-gpt-chat"))
    body_or_events = await replica.completion(CompletionRequest(...))    # APIError for what it refuses
    await replica.answer("stats")                                        # a refusal returned, not raised

The chat model's deployment is this class as it is: the app's ingress (server.QuillServer, the base model's
replica and the app's HTTP side) hands it the requests that name it, through `answer` and `answer_stream`
(peers.py). Ray Serve takes one FastAPI class per app, hence a class without routes for the others.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator

from pipelines.common.params import ServeParams
from pipelines.serve.engine_client import EngineClient, engine_spec
from pipelines.serve.openai_api import Translator
from pipelines.serve.responses import engine_errors, sse_lines
from pipelines.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    retry_after,
)
from pipelines.serve.source import ModelSource, fetch

log = logging.getLogger("ray.serve")


class ModelReplica:
    """Loads the model (safetensors, tokenizer hash checked) in an engine process and answers with it."""

    def __init__(
        self,
        source: ModelSource,
        tracking_uri: str,
        params: ServeParams,
        static_batching: bool = False,
        served: tuple[str, ...] = (),
    ):
        # `params` arrives as the ServeParams the app builder read from params.yaml and validated, not as a
        # model_dump(): Ray pickles a deployment's arguments, and the replica imports ServeParams from quill as the
        # builder does, so the typed object travels as it is. A dict would be validated again here, against
        # whatever defaults this node's code has, and the settings would go object -> dict -> object.
        self.source = source
        folder = fetch(source, tracking_uri)
        spec = engine_spec(folder, params, source.tokenizer_sha256, static_batching)
        self.engine = EngineClient(spec, params.max_ongoing_requests)
        # served: every model the app serves, which a 404 names
        self.openai = Translator(folder, self.engine.process.model_info, source, params, served)
        log.info("quill: serving %s (version %s) from %s", source.name, source.version, folder)

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a replica whose engine process is gone is replaced."""
        if not self.engine.alive():
            raise RuntimeError("the engine process stopped")

    def __del__(self):  # Ray Serve calls it when the replica shuts down
        if hasattr(self, "engine"):
            self.engine.close()

    # -- what it answers ------------------------------------------------------------------------------------------
    async def health(self, model: str | None = None) -> dict:
        self.openai.check_model(model)
        if not self.engine.alive():
            raise APIError(503, "the engine process stopped", None, "server_error", headers=retry_after())
        return {"status": "ok", "model": self.source.name, "version": self.source.version}

    async def models(self) -> dict:
        return self.openai.models()

    async def stats(self, model: str | None = None) -> dict:
        """The scheduler's occupancy, counters and the replica's memory (tests and operators)."""
        self.openai.check_model(model)
        return {"model": self.source.name, "version": self.source.version, **self.engine.stats()}

    async def tokenize(self, req: TokenizeRequest) -> dict:
        return self.openai.tokenize(req)

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        return self.openai.detokenize(req)

    async def tokenizer_info(self, model: str | None = None) -> dict:
        self.openai.check_model(model)
        return self.openai.tokenizer_info()

    async def completion(self, req: CompletionRequest) -> dict | AsyncIterator[dict]:
        """The completion's body, or its stream's events."""
        self.openai.check(req)
        prompts, params = self.openai.completion_input(req)
        with engine_errors():
            request = await self.engine.submit(prompts, params, req.n)
            if req.stream:
                return self.openai.completion_chunks(req, prompts, self.engine.updates(request))
            done = await self.engine.completions(request)
        return self.openai.completion_body(req, prompts, done)

    async def chat_completion(self, req: ChatRequest) -> dict | AsyncIterator[dict]:
        """The chat completion's body, or its stream's events."""
        self.openai.check(req)
        prompt, params = self.openai.chat_input(req)
        with engine_errors():
            request = await self.engine.submit([prompt], params, req.n)
            if req.stream:
                return self.openai.chat_chunks(req, prompt, self.engine.updates(request))
            done = await self.engine.completions(request)
        return self.openai.chat_body(req, prompt, done)

    # -- what the app's ingress hands on (peers.py) -------------------------------------------------------------
    async def answer(self, method: str, *args):
        """`method(*args)` of this class, a refusal returned as a value (Ray would wrap it if raised)."""
        try:
            out = getattr(ModelReplica, method)(self, *args)
            return await out if inspect.isawaitable(out) else out
        except APIError as exc:
            return exc

    async def answer_stream(self, method: str, req: CompletionRequest | ChatRequest):
        """The lines of the stream `method` answers `req` with; a refusal as the one item."""
        try:
            events = await getattr(ModelReplica, method)(self, req)
        except APIError as exc:
            yield exc
            return
        async for line in sse_lines(events):
            yield line
