"""The generation engine: prefill once, then decode with a preallocated KV cache.

    >>> engine = Engine(model, tokenizer)          # tokenizer: a `tokenizers.Tokenizer`
    >>> [c] = engine.generate(["To be, or"], SamplingParams(max_tokens=8, temperature=0))
    >>> c.text, c.finish_reason

Prompts of different lengths are batched with left padding (positions count from each row's first
real token, padding is masked out); each row stops on its own (end-of-text, stop token ids, stop
strings, or max_tokens). Sampling controls mean what they mean in the OpenAI API and Hugging Face
`generate`. Logprobs are those of the model's own distribution (log_softmax of the raw logits),
before temperature, penalties or filtering.

Tokenizer: a `tokenizers.Tokenizer` (what the tokenize stage writes as tokenizer.json). A Hugging Face
`PreTrainedTokenizerFast`, or a path to a tokenizer.json or a folder holding one, is accepted and
unwrapped to that.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from model.transformer import GPT, KVCache

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[EOS]")


@dataclass
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1) = off
    top_p: float = 1.0  # nucleus: smallest set of tokens with probability >= top_p
    min_p: float = 0.0  # drop tokens with prob < min_p * (top token's prob)
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive (multiply negative) logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtract once from the logits of generated tokens
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    stop: list[str] | str | None = None  # stop strings, matched on decoded text, excluded from the output
    stop_token_ids: list[int] | None = None  # extra token ids that end a row (eos always does)
    ignore_eos: bool = False  # keep going past end-of-text (benchmarks)
    seed: int | None = None  # same seed, same output
    n: int = 1  # samples per prompt
    logprobs: int | None = None  # return each chosen token's logprob and the top-N alternatives
    echo: bool = False  # return the prompt tokens' logprobs (lm-eval's local-completions)
    num_beams: int = 1  # > 1: deterministic beam search (needs temperature=0)
    no_repeat_ngram_size: int = 0  # ban any n-gram from occurring twice (prompt included)
    length_penalty: float = 1.0  # beam search: score = sum logprob / length ** length_penalty

    def __post_init__(self):
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens", "an integer >= 0", self.max_tokens)
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 or -1 = off)", self.top_k)
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of token ids", self.stop_token_ids)
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs", "None or an integer in [0, 20]", self.logprobs)
        _check(_is_int(self.num_beams) and self.num_beams >= 1, "num_beams", "an integer >= 1", self.num_beams)
        _check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "an integer >= 0", self.no_repeat_ngram_size)
        _check(_is_num(self.length_penalty), "length_penalty", "a number", self.length_penalty)
        if self.num_beams > 1:
            _check(self.temperature == 0, "temperature", "0 when num_beams > 1 (beam search is deterministic)", self.temperature)
            _check(self.n <= self.num_beams, "n", f"<= num_beams ({self.num_beams}) in beam search", self.n)
            _check(self.logprobs is None, "logprobs", "None when num_beams > 1", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def _check(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


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


class _Detokenizer:
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


class _Row:
    """One sequence being generated: its tokens, text and why it stopped."""

    def __init__(self, index, prompt_ids, params: SamplingParams, stop_ids: set[int], decode, incremental: bool):
        self.index, self.prompt_ids, self.params, self.stop_ids = index, prompt_ids, params, stop_ids
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.decode = decode
        self.detok = _Detokenizer(decode) if incremental else None
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
        if self.params.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
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
            index=self.index, text=self.text, token_ids=list(self.ids), finish_reason=self.finish_reason or "length",
            prompt_token_ids=list(self.prompt_ids), logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
        )


class Engine:
    """Batched generation, streaming and scoring over a GPT and its tokenizer."""

    def __init__(self, model: GPT, tokenizer, device=None, compile: bool = False, eos_token_id: int | None = None):
        self.tokenizer, hf_eos = _unwrap_tokenizer(tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = model.config
        self._forward = torch.compile(model, dynamic=True) if compile else model
        if eos_token_id is None:
            eos_token_id = hf_eos
        if eos_token_id is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            eos_token_id = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
        self.eos_token_id = eos_token_id
        self._kv: KVCache | None = None
        self._token_text: dict[int, str] = {}

    @classmethod
    def from_pretrained(cls, path, expected_tokenizer_sha256: str | None = None, device=None, compile: bool = False) -> Engine:
        """Model and tokenizer from a folder written by save_pretrained."""
        import json

        from model.hf import load_pretrained

        model = load_pretrained(path, expected_tokenizer_sha256, map_location=device or "cpu")
        cfg = json.loads((Path(path) / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(model, Path(path) / "tokenizer.json", device=device, compile=compile, eos_token_id=eos)

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._token_text[token_id]

    # -- public API -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Completions for every prompt (n per prompt, grouped by prompt, in order)."""
        params = params or SamplingParams()
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        if not prompt_ids:
            return []
        self._check_fits(prompt_ids, params)
        if params.num_beams > 1:
            return [c for i, p in enumerate(prompt_ids) for c in self._beam_search(i, p, params)]
        rows = [
            _Row(i, p, params, self._stop_ids(params), self.decode, incremental=bool(params.stop))
            for i, p in enumerate(prompt_ids) for _ in range(params.n)
        ]
        for _ in self._decode(rows, params):
            pass
        return [r.completion() for r in rows]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yield one chunk per generated token with the text that became final (single prompt, n=1)."""
        params = params or SamplingParams()
        _check(params.n == 1, "n", "1 when streaming", params.n)
        _check(params.num_beams == 1, "num_beams", "1 when streaming", params.num_beams)
        ids = self._prompt_ids(prompt)
        self._check_fits([ids], params)
        row = _Row(0, ids, params, self._stop_ids(params), self.decode, incremental=True)
        for _ in self._decode([row], params):
            final = row.final_text()
            chunk = StreamChunk(row.ids[-1], final[row.emitted :], row.finish_reason,
                                row.logprobs[-1] if row.logprobs else None)
            row.emitted = len(final)
            yield chunk
        if row.finish_reason is None:  # max_tokens == 0
            row.finish_reason = "length"
            yield StreamChunk(None, "", "length")

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8) -> list[tuple[float, bool]]:
        """For each (context_ids, continuation_ids): (sum of the continuation's logprobs given the
        context, whether greedy decoding would have produced the continuation). lm-eval's contract.

        With batch_size > 1, requests that share a context (the choices of a multiple-choice item) are
        scored together: the context runs once into the KV cache, then every continuation from it, several
        items per batch. The rest are batched, longest first, right-padded. Either way the output head runs
        only where a continuation token is predicted.
        """
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (ctx, cont) in enumerate(requests):
            _check(len(ctx) > 0, "context_ids", "non-empty (start with an end-of-text token)", list(ctx))
            _check(len(cont) > 0, "continuation_ids", "non-empty", list(cont))
            n = len(ctx) + len(cont) - 1
            if n > self.config.block_size:
                raise ValueError(f"request {i}: context + continuation is {n + 1} tokens, more than block_size + 1 = {self.config.block_size + 1}")
        singles = list(range(len(requests)))
        if batch_size > 1:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (ctx, _) in enumerate(requests):
                groups.setdefault(tuple(ctx), []).append(i)
            singles = [m[0] for m in groups.values() if len(m) == 1]
            chunks = [m[s : s + batch_size] for m in groups.values() if len(m) > 1 for s in range(0, len(m), batch_size)]
            for batch in self._pack_shared_contexts(requests, chunks, batch_size):
                members = [i for m in batch for i in m]
                for i, result in zip(members, self._shared_context_loglikelihood([[requests[i] for i in m] for m in batch])):
                    out[i] = result
        order = sorted(singles, key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            seqs = [list(requests[i][0]) + list(requests[i][1]) for i in chunk]
            hidden = self.model.hidden_states(self._right_padded([q[:-1] for q in seqs]))
            # the head only where a continuation token is predicted: position p predicts token p + 1
            spans = [hidden[r, len(requests[i][0]) - 1 : len(seqs[r]) - 1] for r, i in enumerate(chunk)]
            for i, result in zip(chunk, self._score_continuations(spans, [requests[i][1] for i in chunk])):
                out[i] = result
        return out

    def _pack_shared_contexts(self, requests, chunks: list[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
        """Batches of same-context chunks: at most batch_size continuations, and the longest context plus the
        longest continuation within the model's context (they share cache slots). Longest contexts first, so
        similar lengths share a batch."""
        batch, rows, ctx_len, cont_len = [], 0, 0, 0
        for chunk in sorted(chunks, key=lambda m: -len(requests[m[0]][0])):
            c, t = len(requests[chunk[0]][0]), max(len(requests[i][1]) for i in chunk) - 1
            if batch and (rows + len(chunk) > batch_size or max(ctx_len, c) + max(cont_len, t) > self.config.block_size):
                yield batch
                batch, rows, ctx_len, cont_len = [], 0, 0, 0
            batch.append(chunk)
            rows, ctx_len, cont_len = rows + len(chunk), max(ctx_len, c), max(cont_len, t)
        if batch:
            yield batch

    def _shared_context_loglikelihood(self, groups) -> list[tuple[float, bool]]:
        """loglikelihood for groups of requests that share a context, in order: the contexts run once (right-padded
        together) into the KV cache, each is copied to the rows of its continuations, then every continuation
        runs from there at its own positions, with the context padding masked out."""
        ctxs = [list(g[0][0]) for g in groups]
        conts = [list(c) for g in groups for _, c in g]
        owner = [k for k, g in enumerate(groups) for _ in g]  # context of each continuation row
        L = max(len(c) for c in ctxs)
        cache = self.kv_cache(len(conts))
        hidden = self.model.hidden_states(self._right_padded(ctxs), kv_cache=cache)
        # a context's last position predicts the first token of each of its continuations
        first = [hidden[k, len(c) - 1 : len(c)] for k, c in enumerate(ctxs)]
        cache.reorder(torch.tensor(owner, device=self.device))
        spans = [first[k] for k in owner]
        T = max(len(c) for c in conts) - 1
        if T > 0:
            ctx_len = torch.tensor([len(ctxs[k]) for k in owner], device=self.device)[:, None]
            slots = torch.arange(L + T, device=self.device)[None, :]
            hidden = self.model.hidden_states(
                self._right_padded([c[:-1] for c in conts]), position_ids=ctx_len + slots[:, :T], kv_cache=cache,
                attention_mask=(slots < ctx_len) | (slots >= L),  # the context's real tokens, then the continuation
            )
            spans = [torch.cat([first[k], hidden[r, : len(conts[r]) - 1]]) for r, k in enumerate(owner)]
        return self._score_continuations(spans, conts)

    def _right_padded(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B, longest) token ids on the engine's device; right padding never changes earlier positions of a causal model."""
        idx = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for r, q in enumerate(seqs):
            idx[r, : len(q)] = torch.tensor(q, dtype=torch.long)
        return idx.to(self.device)

    def _score_continuations(self, spans: list[torch.Tensor], continuations) -> list[tuple[float, bool]]:
        """spans[r]: the hidden states (len(cont), n_embd) that predict continuations[r] -> (logprob sum, greedy?)."""
        logp = torch.log_softmax(self.model.logits(torch.cat(spans)), dim=-1)
        target = torch.tensor([t for c in continuations for t in c], device=self.device)
        token_lp = logp.gather(1, target[:, None]).squeeze(1)
        hit = logp.argmax(-1) == target
        out, at = [], 0
        for c in continuations:
            n = len(c)
            out.append((token_lp[at : at + n].sum().item(), bool(hit[at : at + n].all())))
            at += n
        return out

    def kv_cache(self, batch_size: int) -> KVCache:
        """The engine's cache, allocated once (block_size slots) and reused; grows only for a larger batch."""
        if self._kv is None or self._kv.batch_size < batch_size:
            dtype = next(self.model.parameters()).dtype
            self._kv = None
            self._kv = KVCache(self.config, batch_size, device=self.device, dtype=dtype)
        self._kv.reset()
        return self._kv

    # -- internals ------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            if self.eos_token_id is None:
                raise ValueError("prompt is empty and the tokenizer has no end-of-text token to start from")
            ids = [self.eos_token_id]
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt has token ids outside [0, vocab_size={self.config.vocab_size})")
        return ids

    def _check_fits(self, prompt_ids: list[list[int]], params: SamplingParams) -> None:
        longest = max(len(p) for p in prompt_ids)
        if longest + params.max_tokens > self.config.block_size:
            raise ValueError(
                f"prompt ({longest} tokens) + max_tokens ({params.max_tokens}) = {longest + params.max_tokens} "
                f"exceeds the model's context (block_size {self.config.block_size}); shorten the prompt or lower max_tokens"
            )

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.add(self.eos_token_id)
        return ids

    def _logprob_records(self, logp: torch.Tensor, chosen: torch.Tensor, n_top: int) -> list[TokenLogprob]:
        """logp (N, V) log-probs, chosen (N,) ids -> one record per row."""
        lp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
        tops = [[]] * len(lp)
        if n_top:
            v, i = logp.topk(n_top, dim=-1)
            tops = [[(t, self.token_text(t), x) for t, x in zip(ti, vi)] for ti, vi in zip(i.tolist(), v.tolist())]
        return [TokenLogprob(t, self.token_text(t), x, top) for t, x, top in zip(chosen.tolist(), lp, tops)]

    def _prompt_logprobs(self, logits: torch.Tensor, idx: torch.Tensor, lens: list[int], n_top: int) -> list[list[TokenLogprob]]:
        """Per row, a record for each prompt token (None for the first): from the prefill logits."""
        L = idx.size(1)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position p predicts token p + 1
        out = []
        for r, n in enumerate(lens):
            first = L - n
            recs = [TokenLogprob(int(idx[r, first]), self.token_text(int(idx[r, first])), None)]
            if n > 1:
                recs += self._logprob_records(logp[r, first : L - 1], idx[r, first + 1 :], n_top)
            out.append(recs)
        return out

    def _prefill(self, prompt_ids: list[list[int]], total: int, want_all_logits: bool):
        """Left-pad and run the prompts through the model, filling the cache.

        Returns (logits, idx, positions (B, total) or None, mask (B, total) or None); positions and
        mask cover every slot the decode will use, so decode steps only slice them.
        """
        B = len(prompt_ids)
        lens = [len(p) for p in prompt_ids]
        L = max(lens)
        idx = torch.zeros(B, L, dtype=torch.long)
        for r, p in enumerate(prompt_ids):
            idx[r, L - len(p) :] = torch.tensor(p)
        idx = idx.to(self.device)
        cache = self.kv_cache(B)
        positions = mask = None
        if min(lens) != L:
            pad = torch.tensor([L - n for n in lens], device=self.device)[:, None]
            slots = torch.arange(total, device=self.device)[None, :]
            mask = slots >= pad  # (B, total): False on left padding
            positions = (slots - pad).clamp(min=0)
        logits, _ = self._forward(
            idx, position_ids=None if positions is None else positions[:, :L],
            attention_mask=None if mask is None else mask[:, :L], kv_cache=cache,
            logits_to_keep=0 if want_all_logits else 1,
        )
        return logits, idx, positions, mask, cache

    @torch.inference_mode()
    def _decode(self, rows: list[_Row], params: SamplingParams) -> Iterator[None]:
        """Prefill, then decode one token per step for every row; yields after each step."""
        B = len(rows)
        L = max(len(r.prompt_ids) for r in rows)
        total = L + params.max_tokens
        logits, idx, positions, mask, cache = self._prefill([r.prompt_ids for r in rows], total, params.echo)
        if params.echo:
            for r, recs in zip(rows, self._prompt_logprobs(logits, idx, [len(r.prompt_ids) for r in rows], params.logprobs or 0)):
                r.prompt_logprobs = recs
        if params.max_tokens == 0:
            return
        last = logits[:, -1]  # (B, V)

        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        V = self.config.vocab_size
        seen = counts = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for b, r in enumerate(rows):
                seen[b, r.prompt_ids] = True
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros(B, V, device=self.device)
        history = [list(r.prompt_ids) for r in rows] if params.no_repeat_ngram_size else None

        for t in range(params.max_tokens):
            x = apply_penalties(last, params, seen, counts, history)
            if params.greedy:
                nxt = x.max(dim=-1).indices  # faster than argmax on CPU
            else:
                nxt = torch.multinomial(sampling_probs(x, params), 1, generator=gen).squeeze(1)
            recs = None
            if params.logprobs is not None:
                recs = self._logprob_records(torch.log_softmax(last, dim=-1), nxt, params.logprobs)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            if counts is not None:
                counts.scatter_add_(1, nxt[:, None], torch.ones_like(counts[:, :1]))
            for b, (r, tok) in enumerate(zip(rows, nxt.tolist())):
                if r.finish_reason is None:
                    r.append(tok, recs[b] if recs else None)
                if history is not None:
                    history[b].append(tok)
            yield
            if t == params.max_tokens - 1 or all(r.finish_reason for r in rows):
                break
            s = L + t  # slot of the token being fed
            logits, _ = self._forward(
                nxt[:, None], position_ids=None if positions is None else positions[:, s : s + 1],
                attention_mask=None if mask is None else mask[:, : s + 1], kv_cache=cache, logits_to_keep=1,
            )
            last = logits[:, -1]


    @torch.inference_mode()
    def _beam_search(self, index: int, prompt_ids: list[int], params: SamplingParams) -> list[Completion]:
        """Deterministic beam search for one prompt; returns the best n hypotheses."""
        K, L, V = params.num_beams, len(prompt_ids), self.config.vocab_size
        self.kv_cache(K)  # make room for K rows before the prefill (which uses row 0)
        logits, idx, _, _, cache = self._prefill([prompt_ids], L + params.max_tokens, params.echo)
        prompt_lp = self._prompt_logprobs(logits, idx, [L], 0)[0] if params.echo else None
        for tensor in cache.k + cache.v:
            tensor[1:K, :, :L] = tensor[0:1, :, :L]
        stop_ids = self._stop_ids(params)
        beams: list[list[int]] = [[]]  # generated ids per live beam
        scores = torch.zeros(1, device=self.device)
        last = logits[:, -1]  # (live beams, V)
        finished: list[tuple[float, float, list[int], str, str]] = []  # (norm score, sum logprob, ids, text, reason)

        def norm(score, length):
            return score / (max(length, 1) ** params.length_penalty)

        for t in range(params.max_tokens):
            seen = counts = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(len(beams), V, dtype=torch.bool, device=self.device)
                for b, ids in enumerate(beams):
                    seen[b, prompt_ids + ids] = True
            if params.presence_penalty or params.frequency_penalty:
                counts = torch.zeros(len(beams), V, device=self.device)
                for b, ids in enumerate(beams):
                    if ids:
                        counts[b].index_add_(0, torch.tensor(ids, device=self.device), torch.ones(len(ids), device=self.device))
            history = [prompt_ids + ids for ids in beams] if params.no_repeat_ngram_size else None
            logp = torch.log_softmax(apply_penalties(last, params, seen, counts, history), dim=-1)
            cand = (scores[:, None] + logp).view(-1)
            top_scores, top_idx = cand.topk(min(2 * K, cand.numel()))
            keep_beam, keep_tok, keep_score = [], [], []
            for rank, (s, j) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                if s == float("-inf"):
                    break
                b, tok = divmod(j, V)
                ids = beams[b] + [tok]
                if tok in stop_ids:
                    if rank < K:
                        finished.append((norm(s, len(ids)), s, ids, self.decode(ids[:-1]), "stop"))
                    continue
                if params.stop:
                    text = self.decode(ids)
                    hits = [i for i in (text.find(x) for x in params.stop) if i >= 0]
                    if hits:
                        if rank < K:
                            finished.append((norm(s, len(ids)), s, ids, text[: min(hits)], "stop"))
                        continue
                keep_beam.append(b), keep_tok.append(tok), keep_score.append(s)
                if len(keep_beam) == K:
                    break
            if not keep_beam:
                break
            beams = [beams[b] + [tok] for b, tok in zip(keep_beam, keep_tok)]
            scores = torch.tensor(keep_score, device=self.device)
            if t == params.max_tokens - 1:
                break
            # HF's early stop: K finished and no live beam can beat the worst of the best K
            if len(finished) >= K:
                worst = sorted(f[0] for f in finished)[-K]
                if norm(keep_score[0], len(beams[0])) <= worst:
                    beams = []
                    break
            beam_idx = torch.tensor(keep_beam, device=self.device)
            cache.reorder(beam_idx)
            tokens = torch.tensor(keep_tok, device=self.device)[:, None]
            logits, _ = self._forward(tokens, kv_cache=cache, logits_to_keep=1)
            last = logits[:, -1]
        for ids, s in zip(beams, scores.tolist()):
            finished.append((norm(s, len(ids)), s, ids, self.decode(ids), "length"))
        finished.sort(key=lambda f: -f[0])
        return [
            Completion(index=index, text=text, token_ids=ids, finish_reason=reason, prompt_token_ids=list(prompt_ids),
                       prompt_logprobs=prompt_lp, cumulative_logprob=s)
            for _, s, ids, text, reason in finished[: params.n]
        ]


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen=None, counts=None, history=None) -> torch.Tensor:
    """Penalties and bans on raw logits (B, V).

    seen: (B, V) bool, tokens in prompt or output (repetition_penalty); counts: (B, V) float, how
    often each token was generated (presence/frequency penalties); history: per row, prompt + output
    ids (no_repeat_ngram_size).
    """
    x = logits
    if seen is not None:
        p = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    if counts is not None:
        x = x - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
    if history is not None:
        x = x.clone() if x is logits else x
        for b, seq in enumerate(history):
            banned = _banned_ngram_tokens(seq, params.no_repeat_ngram_size)
            if banned:
                x[b, banned] = float("-inf")
    return x


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a row is sampled from (B, V): temperature, then top_k, top_p, min_p."""
    return torch.softmax(filter_logits(logits / params.temperature, params), dim=-1)


def filter_logits(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top_k, top_p and min_p on temperature-scaled logits (B, V), in Hugging Face's order."""
    if params.top_k and params.top_k < x.size(-1):
        kth = x.topk(params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (the top one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[:, 0] = False
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    if params.min_p > 0.0:
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return x


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in seq."""
    if len(seq) < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1 :])
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]


def _unwrap_tokenizer(tokenizer):
    """(tokenizers.Tokenizer, eos id or None) from a Tokenizer, an HF fast tokenizer or a path."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)), None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend, getattr(tokenizer, "eos_token_id", None)
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, a PreTrainedTokenizerFast or a path, got {type(tokenizer).__name__}")
