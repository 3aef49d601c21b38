"""OpenAI's API over quill's engine: requests in (prompts as token ids, a chat as its ChatML prompt, SamplingParams,
the server's caps) and completions out (response bodies and stream chunks), plus the tokenizer routes.

    openai = Translator(folder, (block_size, vocab_size, eos_token_id), source, serve_params)
    prompts, params = openai.completion_input(req)          # 400/404 naming the parameter
    body = openai.completion_body(req, prompts, completions)
    chunks = openai.completion_chunks(req, prompts, engine.updates(request))   # events for responses.sse

The request schemas are in schemas.py, the smaller response shapes (usage, logprobs, errors, events) in
responses.py; the deployment (server.py) passes requests between this and the engine client.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer

from model import SamplingParams
from model.chat import NoChatTemplateError, chat_markers, encode_chat, literal
from model.scheduler import RowUpdate
from model.sequence import Completion
from pipelines.common.params import ServeParams
from pipelines.serve.responses import chat_logprobs, coalesced, legacy_logprobs, legacy_records, param_of, usage
from pipelines.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    check_caps,
    short,
)
from pipelines.serve.source import ModelSource

Batches = AsyncIterator[list[tuple[int, RowUpdate]]]  # (choice index, update) lists: EngineClient.updates


class Translator:
    """The served model as OpenAI's API sees it (its name and version, tokenizer, context and the server's caps):
    turns requests into the engine's inputs and completions into OpenAI's responses."""

    def __init__(
        self,
        folder: Path,
        model_info: tuple[int, int, int | None],
        source: ModelSource,
        limits: ServeParams,
        served: tuple[str, ...] = (),
    ):
        # the model's text side; the engine process checked the tokenizer's hash before loading the weights
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.block_size, self.vocab_size, self.eos_token_id = model_info
        self.source, self.limits = source, limits
        self.served = served or (source.name,)  # the names of every model the app serves, for a 404's message
        self.created = int(time.time())
        try:
            self.im_start, self.im_end = chat_markers(self.tokenizer)
        except NoChatTemplateError:
            self.im_start = self.im_end = None
        # chat content is encoded literally: a user typing "<|im_end|>" must not close their own turn
        self.literal = literal(self.tokenizer)

    # -- requests in -----------------------------------------------------------------------------
    def check(self, req: SamplingFields) -> None:
        """404 for another model's name, 400 past the server's caps (params.yaml)."""
        self.check_model(req.model)
        check_caps(req, self.limits)

    def completion_input(self, req: CompletionRequest) -> tuple[list[list[int]], SamplingParams]:
        prompts = self.prompts(req.prompt)
        echo = req.echo and req.logprobs is not None  # echo's text needs no scoring; its logprobs do
        return prompts, self.sampling_params(req, prompts, req.max_tokens, logprobs=req.logprobs, echo=echo)

    def chat_input(self, req: ChatRequest) -> tuple[list[int], SamplingParams]:
        if self.im_end is None:
            raise APIError(
                400,
                f"model {self.source.name!r} has no chat template (its tokenizer has no ChatML markers): "
                "use /v1/completions with it, or a chat model",
                "model",
            )
        prompt = self.chat_prompt(req)
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, [prompt], max_tokens, logprobs=n_top, echo=False)
        return prompt, replace(params, stop_token_ids=[*params.stop_token_ids, self.im_end])

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.source.name, self.source.uri):
            served = ", ".join(repr(name) for name in self.served)
            raise APIError(
                404,
                f"model {short(model)} does not exist; this server serves {served}",
                "model",
                code="model_not_found",
            )

    def check_ids(self, ids: list[int], param: str) -> None:
        V = self.vocab_size
        if any(t >= V for t in ids):
            raise APIError(400, f"{param} has token ids outside [0, vocab_size={V})", param)

    def prompts(self, prompt: str | list) -> list[list[int]]:
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
            self.check_ids(ids, "prompt")
            out.append(ids)
        return out

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        """ChatML (model/chat.py): the ids `AutoTokenizer.apply_chat_template` and the engine give."""
        return encode_chat(self.literal, [{"role": m.role, "content": m.content} for m in req.messages]).ids

    def sampling_params(
        self, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None, echo: bool
    ) -> SamplingParams:
        """max_tokens None: serve.default_max_tokens, or what room the context leaves the longest prompt."""
        room = self.block_size - max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = max(0, min(self.limits.default_max_tokens, room))
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
            raise APIError(400, str(exc), param_of(str(exc))) from None

    # -- completions out -------------------------------------------------------------------------
    def completion_body(self, req: CompletionRequest, prompts: list[list[int]], done: list[Completion]) -> dict:
        choices = []
        for i, c in enumerate(done):
            prompt_text = self.decode(prompts[i // req.n]) if req.echo else ""
            lp = legacy_logprobs(c, req.echo) if req.logprobs is not None else None
            choices.append({"index": i, "text": prompt_text + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**self.meta("cmpl", "text_completion"), "choices": choices, "usage": usage(prompts, done)}

    def chat_body(self, req: ChatRequest, prompt: list[int], done: list[Completion]) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs) if req.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]
        return {**self.meta("chatcmpl", "chat.completion"), "choices": choices, "usage": usage([prompt], done)}

    async def completion_chunks(self, req: CompletionRequest, prompts: list[list[int]], batches: Batches):
        """The events of a completions stream: the echoed prompts first, then each choice's text as it comes,
        grouped by serve.stream_interval, then the usage if the request asked for it."""
        meta = self.meta("cmpl", "text_completion")
        n_choices = len(prompts) * req.n
        done: list[Completion] = []
        offsets = [0] * n_choices  # text_offset of each choice's next token
        if req.echo:
            for i in range(n_choices):
                text = self.decode(prompts[i // req.n])
                yield {**meta, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}
        async for i, text, recs, finish, completion in coalesced(batches, self.limits.stream_interval):
            if completion is not None:
                done.append(completion)
            lp = None
            if req.logprobs is not None:
                lp = legacy_records(recs, offsets[i])
                offsets[i] += sum(len(r.token) for r in recs)
            yield {**meta, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**meta, "choices": [], "usage": usage(prompts, done)}

    async def chat_chunks(self, req: ChatRequest, prompt: list[int], batches: Batches):
        """The events of a chat stream: the assistant's role, its content as it comes, then the usage if asked."""
        meta = self.meta("chatcmpl", "chat.completion.chunk")
        done: list[Completion] = []
        role = {"role": "assistant", "content": ""}
        yield {**meta, "choices": [{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}]}
        async for i, text, recs, finish, completion in coalesced(batches, self.limits.stream_interval):
            if completion is not None:
                done.append(completion)
            lp = chat_logprobs(recs) if req.logprobs and recs else None
            delta = {"content": text} if text else {}
            yield {**meta, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**meta, "choices": [], "usage": usage([prompt], done)}

    def meta(self, prefix: str, obj: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.source.name,
            "system_fingerprint": f"{self.source.name}-v{self.source.version}",
        }

    # -- the model and its tokenizer -------------------------------------------------------------
    def models(self) -> dict:
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

    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.block_size}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return {"prompt": self.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        """vLLM's route: with it and /tokenize, lm-eval's `local-completions` tokenizes through the server."""
        eos = None if self.eos_token_id is None else self.tokenizer.id_to_token(self.eos_token_id)
        return {"eos_token": eos, "bos_token": None, "pad_token": eos, "model_max_length": self.block_size}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # as model.Engine.decode
