"""The Ray Serve deployment: quill's engine behind an OpenAI-compatible FastAPI ingress.

One replica is two processes: the Ray actor, whose event loop answers HTTP, and its engine process
(pipelines/serve/engine_process.py), which holds the model and the continuous-batching `model.Scheduler` and
steps it back to back while there is work. Each has a core of its own (one Python process runs Python on one
core at a time). Every step's updates come back over a pipe; the event loop puts each token on the asyncio
queue of the request it belongs to. A stream sends everything its queue holds as one SSE event (several tokens
when the client or the proxy fell behind). Handlers only translate between OpenAI's JSON and the engine; a
request whose client goes away is cancelled in the scheduler, which frees its KV-cache slot at the next step.
Past serve.max_ongoing_requests sequences (running + waiting) a replica answers 429 in OpenAI's shape with
Retry-After.
"""

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import psutil
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve
from tokenizers import Tokenizer

from model import SamplingParams
from model.scheduler import RowUpdate
from model.sequence import Completion, TokenLogprob
from pipelines.common.params import ServeParams
from pipelines.serve import metrics
from pipelines.serve.edge import EdgeGuard, install_error_handlers
from pipelines.serve.engine_process import EngineFailure, EngineProcess, EngineSpec
from pipelines.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    check_caps,
)
from pipelines.serve.source import ModelSource, fetch

log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1  # what a client refused with 429 waits before retrying

api = FastAPI(title="quill", description="OpenAI-compatible completions from a quill model", version="1")
install_error_handlers(api)
# settings the middleware reads; each replica (one process) fills them in from its config
EDGE = {"api_key": None, "max_body_bytes": ServeParams().max_body_bytes}
api.add_middleware(EdgeGuard, settings=EDGE)
api.add_middleware(metrics.CountRequests)  # outermost: counts what the guard refuses too


# Helpers come before the deployment class: Ray Serve pickles the class when it is decorated, by value,
# so names defined below it would be missing in the replica.


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events in OpenAI's format, ending with [DONE]; a failure after the first event is sent as
    an error event (the status line is already out), never as a silent cut."""

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:  # the engine failed mid-stream
            metrics.ERRORS.inc(tags={"kind": "stream"})
            err = APIError(500, f"generation failed: {type(exc).__name__}", None, "server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(prompts: list[list[int]], done: list[Completion]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in done)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _legacy_records(recs: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's completions logprobs: parallel lists of tokens, their logprobs, top alternatives, text offsets."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for r in recs:
        out["tokens"].append(r.token)
        out["token_logprobs"].append(r.logprob)
        out["top_logprobs"].append({t: lp for _, t, lp in r.top} if r.logprob is not None else None)
        out["text_offset"].append(offset)
        offset += len(r.token)
    return out


def _legacy_logprobs(c: Completion, echo: bool) -> dict:
    recs = (c.prompt_logprobs or [] if echo else []) + (c.logprobs or [])
    return _legacy_records(recs, 0)


def _chat_logprobs(recs: list[TokenLogprob] | None) -> dict:
    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for _, t, lp in r.top]} for r in recs or []
        ]
    }


async def _coalesced(batches: AsyncIterator[list[tuple[int, RowUpdate]]], interval: int = 1):
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


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def _param_of(message: str) -> str | None:
    """The parameter a model-layer ValueError names first ("max_tokens must be ...", "prompt (12 tokens) ...")."""
    word = message.split(" ", 1)[0]
    return word if word.isidentifier() else None


@serve.deployment(name="QuillServer")
@serve.ingress(api)
class QuillServer:
    """One replica: loads the model (safetensors, tokenizer hash checked) and serves it."""

    def __init__(self, source: dict, tracking_uri: str, limits: dict, static_batching: bool = False):
        self.source = ModelSource(**source)
        self.limits = ServeParams(**limits)
        EDGE.update(api_key=os.environ.get("QUILL_API_KEY") or None, max_body_bytes=self.limits.max_body_bytes)
        folder = fetch(self.source, tracking_uri)
        device = "cuda" if self.limits.num_gpus_per_replica > 0 else None  # Ray sets CUDA_VISIBLE_DEVICES
        self.created = int(time.time())
        self._queues: dict[int, asyncio.Queue] = {}
        self._timing: dict[int, metrics.Timing] = {}
        # adds the engine has not answered yet: their future, queue and timings, by token
        self._pending: dict[int, tuple[asyncio.Future, asyncio.Queue, list[metrics.Timing]]] = {}
        self._tokens = itertools.count()
        self.running = self.waiting = 0  # the engine's last report
        self.cancelled = 0  # sequences dropped because their client went away
        self.generated = 0  # tokens generated by this replica
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop the handlers run on
        spec = EngineSpec(
            str(folder),
            self.limits.max_batch_size,
            tokenizer_sha256=self.source.tokenizer_sha256,
            device=device,
            dtype=self.limits.dtype,
            compile=self.limits.compile,
            static=static_batching,
        )
        self.engine_process = EngineProcess(spec, self._from_engine)
        # the model's text side; the engine process checked the tokenizer's hash before loading the weights
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.block_size, self.vocab_size, self.eos_token_id = self.engine_process.model_info
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.im_start, self.im_end = vocab.get("<|im_start|>"), vocab.get("<|im_end|>")
        # chat content is encoded literally: a user typing "<|im_end|>" must not close their own turn
        self.literal = Tokenizer.from_str(self.tokenizer.to_str())
        self.literal.encode_special_tokens = True
        log.info("quill: serving %s (version %s) from %s", self.source.name, self.source.version, folder)

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a replica whose engine process is gone is replaced."""
        if not self.engine_process.alive():
            raise RuntimeError("the engine process stopped")

    def __del__(self):  # Ray Serve calls it when the replica shuts down
        if hasattr(self, "engine_process"):
            self.engine_process.close()

    # -- the engine process ----------------------------------------------------------------------
    def _from_engine(self, msg: tuple) -> None:
        """On the reader thread: every message goes to the event loop, in order."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._handle, msg)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._deliver(*msg[1:])
        elif kind == "added":
            _, token, rids, self.running, self.waiting = msg
            fut, q, timings = self._pending.pop(token)
            for rid, timing in zip(rids, timings):  # registered before any of their tokens can be delivered
                self._queues[rid], self._timing[rid] = q, timing
            if not fut.done():
                fut.set_result(rids)
            else:  # the caller went away while waiting
                self._forget(rids)
        elif kind == "refused":
            _, token, message = msg
            fut, _, _ = self._pending.pop(token)
            if not fut.done():
                fut.set_exception(APIError(400, message, _param_of(message)))
        elif kind == "failed":  # a step failed; the engine dropped what it held and goes on
            self._fail_running(EngineFailure(msg[1]))
        elif kind == "stopped":  # the engine process is gone: nothing in flight will be answered
            self._fail_running(EngineFailure(msg[1]))
            for fut, _, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(APIError(503, msg[1], None, "server_error"))
            self._pending.clear()

    def _fail_running(self, exc: EngineFailure) -> None:
        """On the event loop: fail every request the engine had taken (adds it has not answered yet are still
        answered after the failure)."""
        metrics.ERRORS.inc(tags={"kind": "engine"})
        for q in set(self._queues.values()):
            q.put_nowait(exc)
        self._queues.clear()
        self._timing.clear()

    def _deliver(self, updates: list[RowUpdate], running: int, waiting: int) -> None:
        """On the event loop: one step's tokens to their requests' queues, and the metrics."""
        self.running, self.waiting = running, waiting
        metrics.RUNNING.set(running)
        metrics.QUEUE_LENGTH.set(waiting)
        for u in updates:
            q = self._queues.get(u.rid)
            if q is not None:
                q.put_nowait(u)
            try:
                self._observe(u)
            except Exception:  # metrics must never stop the loop
                log.exception("quill: recording metrics failed")

    def _observe(self, u: RowUpdate) -> None:
        self.generated += u.chunk.token_id is not None
        timing = self._timing.get(u.rid)
        if timing is None:
            return
        if u.chunk.token_id is not None:
            timing.token()
        if u.completion is not None:
            timing.done(len(u.completion.token_ids))
            del self._timing[u.rid]

    async def _submit(
        self, prompts: list[list[int]], params: SamplingParams, n: int
    ) -> tuple[asyncio.Queue, dict[int, int]]:
        """Queue n sequences per prompt in the engine; returns the request's queue and choice index by id."""
        self._loop = asyncio.get_running_loop()
        if not self.engine_process.alive():
            raise APIError(503, "the engine process stopped; the replica restarts", None, "server_error")
        wanted = len(prompts) * n
        held = len(self._queues) + sum(len(timings) for _, _, timings in self._pending.values())
        if held + wanted > self.limits.max_ongoing_requests:
            raise APIError(
                429,
                f"this replica holds {held} sequences and takes at most {self.limits.max_ongoing_requests}; "
                f"retry in {RETRY_AFTER_S} s",
                None,
                "rate_limit_error",
                "server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        q: asyncio.Queue = asyncio.Queue()
        sequences = []
        for p in prompts:
            for j in range(n):
                seed = None if params.seed is None else params.seed + j  # n samples, n different seeds
                sequences.append((p, replace(params, seed=seed)))
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._pending[token] = (fut, q, [metrics.Timing() for _ in sequences])
        try:
            self.engine_process.add(token, sequences)
        except EngineFailure as exc:
            del self._pending[token]
            raise APIError(503, f"{exc}; the replica restarts", None, "server_error") from None
        rids = await fut
        return q, {rid: i for i, rid in enumerate(rids)}

    def _forget(self, rids) -> None:
        self.engine_process.cancel(rids)
        for rid in rids:
            self._queues.pop(rid, None)
            self._timing.pop(rid, None)

    async def _updates(self, q: asyncio.Queue, rids: dict[int, int]) -> AsyncIterator[list[tuple[int, RowUpdate]]]:
        """Lists of (choice index, update), each everything the queue held (at least one), until every sequence
        finished; cancels the rest if the caller goes away."""
        remaining = set(rids)
        try:
            while remaining:
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                out = []
                for u in batch:
                    if isinstance(u, EngineFailure):  # a server fault, named: the stream's error event says it
                        remaining.clear()  # the engine dropped them: nothing to cancel, not cancelled by a client
                        raise APIError(500, f"generation failed: {u}", None, "server_error")
                    if u.completion is not None:
                        remaining.discard(u.rid)
                        self._queues.pop(u.rid, None)
                    out.append((rids[u.rid], u))
                yield out
        finally:
            if remaining:
                self.cancelled += len(remaining)
                metrics.CANCELLED.inc(len(remaining))
                self._forget(remaining)

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        if not self.engine_process.alive():
            raise APIError(503, "the engine process stopped", None, "server_error")
        return {"status": "ok", "model": self.source.name, "version": self.source.version}

    @api.get("/v1/models")
    async def models(self) -> dict:
        card = {
            "id": self.source.name,
            "object": "model",
            "created": self.created,
            "owned_by": "quill",
            "version": self.source.version,
            "uri": self.source.uri,
            "max_model_len": self.block_size,
        }
        return {"object": "list", "data": [card]}

    @api.get("/stats")
    async def stats(self) -> dict:
        """The scheduler's occupancy (tests and operators; the same numbers are Prometheus gauges)."""
        return {
            "running": self.running,
            "waiting": self.waiting,
            "max_batch_size": self.limits.max_batch_size,
            "cancelled": self.cancelled,
            "generated_tokens": self.generated,  # since start: the benchmark's server-side tokens/s
            "torch_threads": self.engine_process.torch_threads,
            "dtype": self.engine_process.dtype,  # the weights' dtype in memory (serve.dtype)
            "engine_pid": self.engine_process.pid,  # the process that holds the model
            "rss_bytes": _rss(os.getpid()) + _rss(self.engine_process.pid),  # the benchmark checks for leaks
        }

    @api.post("/tokenize")
    async def tokenize(self, req: TokenizeRequest) -> dict:
        self._check_model(req.model)
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.block_size}

    @api.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict:
        """vLLM's route: with it and /tokenize, lm-eval's `local-completions` tokenizes through the server."""
        eos_id = self.eos_token_id
        eos = None if eos_id is None else self.tokenizer.id_to_token(eos_id)
        return {
            "eos_token": eos,
            "bos_token": None,
            "pad_token": eos,
            "model_max_length": self.block_size,
        }

    @api.post("/detokenize")
    async def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self._decode(req.tokens)}

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        self._check_model(req.model)
        check_caps(req, self.limits)
        prompts = self._prompts(req.prompt)
        want_logprobs = req.logprobs is not None
        params = self._params(req, prompts, logprobs=req.logprobs, echo=req.echo and want_logprobs)
        q, rids = await self._submit(prompts, params, req.n)
        meta = self._meta("cmpl", "text_completion")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._stream_completion(q, rids, prompts, req, meta, include_usage))
        done = await self._collect(q, rids)
        choices = []
        for i, c in enumerate(done):
            prompt_text = self._decode(prompts[i // req.n]) if req.echo else ""
            lp = _legacy_logprobs(c, req.echo) if want_logprobs else None
            choices.append({"index": i, "text": prompt_text + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**meta, "choices": choices, "usage": _usage(prompts, done)}

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest):
        self._check_model(req.model)
        check_caps(req, self.limits)
        if self.im_start is None or self.im_end is None:
            raise APIError(400, "this model's tokenizer has no ChatML markers; use /v1/completions", "messages")
        prompt = self._chat_prompt(req)
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, [prompt], logprobs=n_top, echo=False)
        params = replace(params, stop_token_ids=[*params.stop_token_ids, self.im_end])
        q, rids = await self._submit([prompt], params, req.n)
        meta = self._meta("chatcmpl", "chat.completion")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._stream_chat(q, rids, prompt, req, meta, include_usage))
        done = await self._collect(q, rids)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.logprobs) if req.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]
        return {**meta, "choices": choices, "usage": _usage([prompt], done)}

    # -- helpers ---------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # as model.Engine.decode

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.source.name, self.source.uri):
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.source.name!r}",
                "model",
                code="model_not_found",
            )

    def _check_ids(self, ids: list[int], param: str) -> None:
        V = self.vocab_size
        if any(t >= V for t in ids):
            raise APIError(400, f"{param} has token ids outside [0, vocab_size={V})", param)

    def _prompts(self, prompt) -> list[list[int]]:
        """A string, strings, token ids or lists of token ids -> token ids per prompt."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        out = []
        for p in prompt:
            ids = self.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            self._check_ids(ids, "prompt")
            out.append(ids)
        return out

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message, then <|im_start|>assistant\\n."""
        nl = self.literal.encode("\n").ids
        ids: list[int] = []
        for m in req.messages:
            ids += [self.im_start, *self.literal.encode(f"{m.role}\n{m.content}").ids, self.im_end, *nl]
        return ids + [self.im_start, *self.literal.encode("assistant\n").ids]

    def _params(self, req: SamplingFields, prompts: list[list[int]], logprobs: int | None, echo: bool):
        room = self.block_size - max(len(p) for p in prompts)
        max_tokens = req.max_tokens if req.max_tokens is not None else max(0, min(self.limits.default_max_tokens, room))
        if max_tokens > room:
            raise APIError(
                400,
                f"prompt ({self.block_size - room} tokens) + max_tokens ({max_tokens}) "
                f"exceeds the model's context ({self.block_size} tokens)",
                "max_tokens",
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                seed=req.seed,
                logprobs=logprobs,
                echo=echo,
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            )
        except ValueError as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from None

    def _meta(self, prefix: str, obj: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.source.name,
            "system_fingerprint": f"{self.source.name}-v{self.source.version}",
        }

    async def _collect(self, q, rids) -> list[Completion]:
        done: list[Completion | None] = [None] * len(rids)
        async for batch in self._updates(q, rids):
            for i, u in batch:
                if u.completion is not None:
                    done[i] = u.completion
        return done

    async def _stream_completion(self, q, rids, prompts, req: CompletionRequest, meta, include_usage):
        meta = {**meta, "object": "text_completion"}
        done: list[Completion] = []
        offsets = [0] * len(rids)  # text_offset of each choice's next token
        if req.echo:
            for i in range(len(rids)):
                text = self._decode(prompts[i // req.n])
                yield {**meta, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}
        async for i, text, recs, finish, completion in _coalesced(self._updates(q, rids), self.limits.stream_interval):
            if completion is not None:
                done.append(completion)
            lp = None
            if req.logprobs is not None:
                lp = _legacy_records(recs, offsets[i])
                offsets[i] += sum(len(r.token) for r in recs)
            yield {**meta, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            yield {**meta, "choices": [], "usage": _usage(prompts, done)}

    async def _stream_chat(self, q, rids, prompt, req: ChatRequest, meta, include_usage):
        meta = {**meta, "object": "chat.completion.chunk"}
        done: list[Completion] = []
        yield {
            **meta,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
        async for i, text, recs, finish, completion in _coalesced(self._updates(q, rids), self.limits.stream_interval):
            if completion is not None:
                done.append(completion)
            lp = _chat_logprobs(recs) if req.logprobs and recs else None
            delta = {"content": text} if text else {}
            yield {**meta, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            yield {**meta, "choices": [], "usage": _usage([prompt], done)}
