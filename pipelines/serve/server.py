"""The Ray Serve deployment: quill's engine behind an OpenAI-compatible FastAPI ingress.

One replica is two processes: the Ray actor, whose event loop answers HTTP, and its engine process
(pipelines/serve/engine_process.py), which holds the model and the continuous-batching `model.Scheduler` and
steps it back to back while there is work; the engine client (engine_client.py) puts each token on the asyncio
queue of the request it belongs to. A stream sends everything its queue holds as one SSE event (several tokens
when the client or the proxy fell behind). The handlers here only adapt HTTP: openai_api.py translates between
OpenAI's JSON and the engine, the engine client queues, cancels and refuses. A request whose client goes away is
cancelled in the scheduler, which frees its KV-cache slot at the next step. Past serve.max_ongoing_requests
sequences (running + waiting) a replica answers 429 in OpenAI's shape with Retry-After, past edge.max_in_flight
HTTP requests 503. Each route's `documented(...)` is what the OpenAPI document says it answers.
"""

import logging

from fastapi import FastAPI
from ray import serve

from pipelines.common.params import ServeParams
from pipelines.serve import metrics
from pipelines.serve.edge import EdgeGuard, expected_key_digest, install_error_handlers, max_in_flight
from pipelines.serve.engine_client import EngineClient, engine_spec
from pipelines.serve.openai_api import Translator
from pipelines.serve.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    Health,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
    engine_errors,
    sse,
)
from pipelines.serve.schemas import (
    GUARDED,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    complete_document,
    documented,
    retry_after,
)
from pipelines.serve.source import ModelSource, fetch

log = logging.getLogger("ray.serve")

api = FastAPI(title="quill", description="OpenAI-compatible completions from a quill model", version="1")
install_error_handlers(api)
fastapi_document = api.openapi


def document() -> dict:
    """/openapi.json: FastAPI's document (made on the first request for it, then kept), completed once."""
    return api.openapi_schema or complete_document(fastapi_document(), (CompletionResponse, ChatCompletionChunk))


api.openapi = document
# settings the middleware reads; each replica (one process) fills them in from its config
EDGE = {"api_key_sha256": None, "max_body_bytes": ServeParams().max_body_bytes, "max_in_flight": None}
api.add_middleware(EdgeGuard, settings=EDGE)
api.add_middleware(metrics.CountRequests)  # outermost: counts what the guard refuses too

# Ray Serve pickles the deployment class when it is decorated, by value: whatever it uses must be defined above it
# or imported from a module (as here), or it is missing in the replica.


@serve.deployment(name="QuillServer")
@serve.ingress(api)
class QuillServer:
    """One replica: loads the model (safetensors, tokenizer hash checked) and serves it."""

    def __init__(self, source: ModelSource, tracking_uri: str, params: ServeParams, static_batching: bool = False):
        # `params` arrives as the ServeParams the app builder read from params.yaml and validated, not as a
        # model_dump(): Ray pickles a deployment's arguments, and the replica imports ServeParams from quill as the
        # builder does, so the typed object travels as it is. A dict would be validated again here, against
        # whatever defaults this node's code has, and the settings would go object -> dict -> object.
        EDGE.update(
            api_key_sha256=expected_key_digest(),
            max_body_bytes=params.max_body_bytes,
            max_in_flight=max_in_flight(params),
        )
        self.source = source
        folder = fetch(source, tracking_uri)
        spec = engine_spec(folder, params, source.tokenizer_sha256, static_batching)
        self.engine = EngineClient(spec, params.max_ongoing_requests)
        self.openai = Translator(folder, self.engine.process.model_info, source, params)
        log.info("quill: serving %s (version %s) from %s", source.name, source.version, folder)

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a replica whose engine process is gone is replaced."""
        if not self.engine.alive():
            raise RuntimeError("the engine process stopped")

    def __del__(self):  # Ray Serve calls it when the replica shuts down
        if hasattr(self, "engine"):
            self.engine.close()

    @api.get("/health", **documented(Health, 413, 503, 500))
    async def health(self) -> dict:
        if not self.engine.alive():
            raise APIError(503, "the engine process stopped", None, "server_error", headers=retry_after())
        return {"status": "ok", "model": self.source.name, "version": self.source.version}

    @api.get("/v1/models", **documented(ModelList, *GUARDED))
    async def models(self) -> dict:
        return self.openai.models()

    @api.get("/stats", **documented(None, *GUARDED))
    async def stats(self) -> dict:
        """The scheduler's occupancy, counters and the replica's memory (tests and operators)."""
        return self.engine.stats()

    @api.post("/tokenize", **documented(TokenizeResponse, 400, 404, *GUARDED))
    async def tokenize(self, req: TokenizeRequest) -> dict:
        return self.openai.tokenize(req)

    @api.get("/tokenizer_info", **documented(TokenizerInfo, *GUARDED))
    async def tokenizer_info(self) -> dict:
        """vLLM's route: with it and /tokenize, lm-eval's `local-completions` tokenizes through the server."""
        return self.openai.tokenizer_info()

    @api.post("/detokenize", **documented(DetokenizeResponse, 400, 404, *GUARDED))
    async def detokenize(self, req: DetokenizeRequest) -> dict:
        return self.openai.detokenize(req)

    @api.post("/v1/completions", **documented(CompletionResponse, 400, 404, 429, *GUARDED, stream=CompletionResponse))
    async def completions(self, req: CompletionRequest):
        self.openai.check(req)
        prompts, params = self.openai.completion_input(req)
        with engine_errors():
            request = await self.engine.submit(prompts, params, req.n)
            if req.stream:
                return sse(self.openai.completion_chunks(req, prompts, self.engine.updates(request)))
            done = await self.engine.completions(request)
        return self.openai.completion_body(req, prompts, done)

    @api.post(
        "/v1/chat/completions",
        **documented(ChatCompletionResponse, 400, 404, 429, *GUARDED, stream=ChatCompletionChunk),
    )
    async def chat(self, req: ChatRequest):
        self.openai.check(req)
        prompt, params = self.openai.chat_input(req)
        with engine_errors():
            request = await self.engine.submit([prompt], params, req.n)
            if req.stream:
                return sse(self.openai.chat_chunks(req, prompt, self.engine.updates(request)))
            done = await self.engine.completions(request)
        return self.openai.chat_body(req, prompt, done)
