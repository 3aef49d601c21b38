"""What generation returns, and one sequence on its way there: tokens, text, stop handling, logprobs.

`Row` is the unit the engine (and a continuous-batching scheduler) advances one token at a time;
`Detokenizer` releases text incrementally without ever splitting a multi-byte character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.sampling import SamplingParams, find_stop


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token decoded on its own (may hold U+FFFD for part of a character)
    logprob: float | None  # None for a prompt's first token
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class Completion:
    index: int  # which prompt this completes
    text: str  # generated text: excludes the prompt, the end token and any stop string
    token_ids: list[int]  # every generated token (a final eos/stop token included)
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when params.echo
    cumulative_logprob: float | None = None  # beam search: the hypothesis' sum of logprobs


@dataclass
class StreamChunk:
    token_id: int | None  # the new token (None on a final flush)
    text: str  # text that became final with this token (may be "" while bytes or a stop string are pending)
    finish_reason: str | None = None  # set on the last chunk
    logprob: TokenLogprob | None = None


class Detokenizer:
    """Incremental decoding that never splits a multi-byte character: text is released only once
    the bytes so far decode without a trailing U+FFFD (the prefix/read offsets of HF TGI)."""

    def __init__(self, decode):
        self.decode, self.ids, self.prefix, self.read = decode, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class Row:
    """One sequence being generated: its tokens, text and why it stopped."""

    def __init__(self, index, prompt_ids, params: SamplingParams, stop_ids: set[int], decode, incremental: bool):
        self.index, self.prompt_ids, self.params, self.stop_ids = index, prompt_ids, params, stop_ids
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.decode = decode
        self.detok = Detokenizer(decode) if incremental else None
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self.max_stop = max((len(s) for s in params.stop), default=0)

    def append(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if token_id in self.stop_ids:
            self._finish("stop")
            return
        if self.detok is not None:
            self._add_text(self.detok.push(token_id))
            if self.finish_reason:
                return
        if len(self.ids) >= self.params.max_tokens:
            self._finish("length")

    def _add_text(self, delta: str) -> None:
        if not delta:
            return
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        cut = find_stop(self.text, self.params.stop, start)
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def _finish(self, reason: str) -> None:
        if self.detok is not None:
            self._add_text(self.detok.flush())
        else:
            ids = self.ids[:-1] if reason == "stop" else self.ids
            self.text = self.decode(ids)
        self.finish_reason = self.finish_reason or reason

    def final_text(self) -> str:
        """Text that can no longer change: holds back a tail that could begin a stop string."""
        if self.finish_reason or not self.params.stop:
            return self.text
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]

    def completion(self) -> Completion:
        return Completion(
            index=self.index,
            text=self.text,
            token_ids=list(self.ids),
            finish_reason=self.finish_reason or "length",
            prompt_token_ids=list(self.prompt_ids),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )
