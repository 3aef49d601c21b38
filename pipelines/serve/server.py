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

An app serves the base model and, beside it, the chat model, each its own deployment of this class (so a promotion
rolls only the promoted model's replicas). The base model's is the ingress: HTTP comes to its replicas (straight
from HAProxy) and they answer its requests themselves, the common case no slower than with one model. A request for
the chat model (its `model`, or none on /v1/chat/completions) takes one hop more: the ingress hands it to the chat
model's deployment through its handle and relays the answer (peers.py).
"""

import asyncio

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipelines.common.params import ServeParams
from pipelines.serve import metrics
from pipelines.serve.edge import EdgeGuard, expected_key_digest, install_error_handlers, max_in_flight
from pipelines.serve.peers import call, relayed, served_name
from pipelines.serve.replica import ModelReplica
from pipelines.serve.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    Health,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
    sse,
)
from pipelines.serve.schemas import (
    GUARDED,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    complete_document,
    documented,
)
from pipelines.serve.source import ModelSource

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
class QuillServer(ModelReplica):
    """The app's ingress: the base model's replica (replica.py), and the HTTP routes of the app's models. A request
    that names another model of the app (`peers`: the chat model's deployment), or a chat that names none when
    there is a chat model, is handed to that model's deployment (peers.py)."""

    def __init__(
        self,
        source: ModelSource,
        tracking_uri: str,
        params: ServeParams,
        static_batching: bool = False,
        peers: dict[str, DeploymentHandle] | None = None,
        chat: str | None = None,
        served: tuple[str, ...] = (),
    ):
        self.peers = peers or {}  # the app's other models' deployments, by served name
        self.default_chat = chat  # the model /v1/chat/completions answers with when a request names none (None: this)
        EDGE.update(
            api_key_sha256=expected_key_digest(),
            max_body_bytes=params.max_body_bytes,
            max_in_flight=max_in_flight(params) * (1 + len(self.peers)),  # the peers' HTTP requests come here too
        )
        ModelReplica.__init__(self, source, tracking_uri, params, static_batching, served)

    def peer(self, model: str | None, default: str | None = None) -> DeploymentHandle | None:
        """The deployment of the other model that `model` (None: `default`) names; None for this replica's own,
        which checks the name itself (404 for a model the app does not serve)."""
        name = default if model is None else served_name(model)
        return self.peers.get(name) if name else None

    @api.get("/health", **documented(Health, 404, 413, 503, 500))
    async def health(self, model: str | None = None) -> dict:
        """200 while the engine of this replica's model (or of the one `model` names) runs."""
        if (peer := self.peer(model)) is not None:
            return await call(peer, "health", model)
        return await ModelReplica.health(self, model)

    @api.get("/v1/models", **documented(ModelList, *GUARDED))
    async def models(self) -> dict:
        listing = await ModelReplica.models(self)
        for theirs in await asyncio.gather(*(call(peer, "models") for peer in self.peers.values())):
            listing["data"] += theirs["data"]
        return listing

    @api.get("/stats", **documented(None, 404, *GUARDED))
    async def stats(self, model: str | None = None) -> dict:
        """The scheduler's occupancy, counters and the replica's memory (tests and operators)."""
        if (peer := self.peer(model)) is not None:
            return await call(peer, "stats", model)
        return await ModelReplica.stats(self, model)

    @api.post("/tokenize", **documented(TokenizeResponse, 400, 404, *GUARDED))
    async def tokenize(self, req: TokenizeRequest) -> dict:
        if (peer := self.peer(req.model)) is not None:
            return await call(peer, "tokenize", req)
        return await ModelReplica.tokenize(self, req)

    @api.get("/tokenizer_info", **documented(TokenizerInfo, 404, *GUARDED))
    async def tokenizer_info(self, model: str | None = None) -> dict:
        """vLLM's route: with it and /tokenize, lm-eval's `local-completions` tokenizes through the server."""
        if (peer := self.peer(model)) is not None:
            return await call(peer, "tokenizer_info", model)
        return await ModelReplica.tokenizer_info(self, model)

    @api.post("/detokenize", **documented(DetokenizeResponse, 400, 404, *GUARDED))
    async def detokenize(self, req: DetokenizeRequest) -> dict:
        if (peer := self.peer(req.model)) is not None:
            return await call(peer, "detokenize", req)
        return await ModelReplica.detokenize(self, req)

    @api.post("/v1/completions", **documented(CompletionResponse, 400, 404, 429, *GUARDED, stream=CompletionResponse))
    async def completions(self, req: CompletionRequest):
        if (peer := self.peer(req.model)) is not None:
            return await (relayed if req.stream else call)(peer, "completion", req)
        out = await self.completion(req)
        return sse(out) if req.stream else out

    @api.post(
        "/v1/chat/completions",
        **documented(ChatCompletionResponse, 400, 404, 429, *GUARDED, stream=ChatCompletionChunk),
    )
    async def chat(self, req: ChatRequest):
        if (peer := self.peer(req.model, default=self.default_chat)) is not None:
            return await (relayed if req.stream else call)(peer, "chat_completion", req)
        out = await self.chat_completion(req)
        return sse(out) if req.stream else out
