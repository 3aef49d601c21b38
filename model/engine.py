"""The generation engine: prefill once, then decode with a preallocated KV cache.

    >>> engine = Engine(model, tokenizer)          # tokenizer: a `tokenizers.Tokenizer`
    >>> [c] = engine.generate(["To be, or"], SamplingParams(max_tokens=8, temperature=0))
    >>> c.text, c.finish_reason

Prompts of different lengths are batched with left padding (positions count from each row's first
real token, padding is masked out); each row stops on its own (end-of-text, stop token ids, stop
strings, or max_tokens). Logprobs are those of the model's own distribution (log_softmax of the raw
logits), before temperature, penalties or filtering. Beam search lives in model/beam.py, log-likelihood
scoring in model/scoring.py.

Tokenizer: a `tokenizers.Tokenizer` (what the tokenize stage writes as tokenizer.json). A Hugging Face
`PreTrainedTokenizerFast`, or a path to a tokenizer.json or a folder holding one, is accepted and
unwrapped to that.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model.beam import beam_search
from model.chat import encode_chat, literal
from model.hf import load_pretrained
from model.sampler import SamplingRows, sample
from model.sampling import SamplingParams, apply_penalties, check_param, penalty_state
from model.scoring import loglikelihood
from model.sequence import Completion, Row, StreamChunk, TokenLogprob
from model.transformer import GPT, KVCache

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[EOS]")


class Engine:
    """Batched generation, streaming and scoring over a GPT and its tokenizer."""

    def __init__(self, model: GPT, tokenizer, device=None, compile: bool = False, eos_token_id: int | None = None):
        self.tokenizer, hf_eos = _unwrap_tokenizer(tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.forward = torch.compile(model, dynamic=True) if compile else model
        if eos_token_id is None:
            eos_token_id = hf_eos
        if eos_token_id is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            eos_token_id = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
        self.eos_token_id = eos_token_id
        self._kv: KVCache | None = None
        self._token_text: dict[int, str] = {}
        self._literal: Tokenizer | None = None  # the tokenizer for chat content, made on first use

    @classmethod
    def from_pretrained(
        cls,
        path,
        expected_tokenizer_sha256: str | None = None,
        device=None,
        compile: bool = False,
        dtype: torch.dtype | str | None = None,
    ) -> Engine:
        """Model and tokenizer from a folder written by save_pretrained. dtype: the weights' dtype in memory, a
        torch.dtype or its name ("bfloat16"); None or "auto" keeps the saved one."""
        model = load_pretrained(path, expected_tokenizer_sha256, map_location=device or "cpu", dtype=dtype_of(dtype))
        cfg = json.loads((Path(path) / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(model, Path(path) / "tokenizer.json", device=device, compile=compile, eos_token_id=eos)

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """ChatML ids of a conversation (model/chat.py), ready for the assistant's reply; generating from them
        should stop at `chat_markers(engine.tokenizer)[1]` (<|im_end|>)."""
        if self._literal is None:
            self._literal = literal(self.tokenizer)
        return encode_chat(self._literal, messages, add_generation_prompt).ids

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._token_text[token_id]

    # -- public API -----------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Completions for every prompt (n per prompt, grouped by prompt, in order)."""
        params = params or SamplingParams()
        prompt_ids = [self.prompt_ids_of(p) for p in prompts]
        if not prompt_ids:
            return []
        self.check_fits(prompt_ids, params)
        if params.num_beams > 1:
            return [c for i, p in enumerate(prompt_ids) for c in beam_search(self, i, p, params)]
        rows = [
            Row(i, p, params, self.stop_ids(params), self.decode, incremental=bool(params.stop))
            for i, p in enumerate(prompt_ids)
            for _ in range(params.n)
        ]
        for _ in self._decode(rows, params):
            pass
        return [r.completion() for r in rows]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yield one chunk per generated token with the text that became final (single prompt, n=1)."""
        params = params or SamplingParams()
        check_param(params.n == 1, "n", "1 when streaming", params.n)
        check_param(params.num_beams == 1, "num_beams", "1 when streaming", params.num_beams)
        ids = self.prompt_ids_of(prompt)
        self.check_fits([ids], params)
        row = Row(0, ids, params, self.stop_ids(params), self.decode, incremental=True)
        for _ in self._decode([row], params):
            final = row.final_text()
            chunk = StreamChunk(
                row.ids[-1], final[row.emitted :], row.finish_reason, row.logprobs[-1] if row.logprobs else None
            )
            row.emitted = len(final)
            yield chunk
        if row.finish_reason is None:  # max_tokens == 0
            row.finish_reason = "length"
            yield StreamChunk(None, "", "length")

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8
    ) -> list[tuple[float, bool]]:
        """lm-eval's contract for (context_ids, continuation_ids) pairs: see model.scoring.loglikelihood."""
        return loglikelihood(self.model, requests, batch_size, self.kv_cache)

    def kv_cache(self, batch_size: int) -> KVCache:
        """The engine's cache, allocated once (block_size slots) and reused; grows only for a larger batch."""
        if self._kv is None or self._kv.batch_size < batch_size:
            dtype = next(self.model.parameters()).dtype
            self._kv = None
            self._kv = KVCache(self.config, batch_size, device=self.device, dtype=dtype)
        self._kv.reset()
        return self._kv

    # -- building blocks (beam search and the continuous-batching scheduler use them too) -------------
    def prompt_ids_of(self, prompt) -> list[int]:
        """A prompt (text or token ids) as checked token ids; an empty one starts from end-of-text."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            if self.eos_token_id is None:
                raise ValueError("prompt is empty and the tokenizer has no end-of-text token to start from")
            ids = [self.eos_token_id]
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt has token ids outside [0, vocab_size={self.config.vocab_size})")
        return ids

    def check_fits(self, prompt_ids: list[list[int]], params: SamplingParams) -> None:
        """ValueError when the longest prompt plus max_tokens exceeds the model's context."""
        longest = max(len(p) for p in prompt_ids)
        if longest + params.max_tokens > self.config.block_size:
            raise ValueError(
                f"prompt ({longest} tokens) + max_tokens ({params.max_tokens}) = {longest + params.max_tokens} "
                f"exceeds the model's context (block_size {self.config.block_size}); shorten the prompt or lower max_tokens"
            )

    def stop_ids(self, params: SamplingParams) -> set[int]:
        """Token ids that end a row: stop_token_ids, and end-of-text unless ignore_eos."""
        ids = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.add(self.eos_token_id)
        return ids

    def logprob_records(self, logp: torch.Tensor, chosen: torch.Tensor, n_top: int) -> list[TokenLogprob]:
        """logp (N, V) log-probs, chosen (N,) ids -> one record per row."""
        lp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
        tops = [[]] * len(lp)
        if n_top:
            v, i = logp.topk(n_top, dim=-1)
            tops = [[(t, self.token_text(t), x) for t, x in zip(ti, vi)] for ti, vi in zip(i.tolist(), v.tolist())]
        return [TokenLogprob(t, self.token_text(t), x, top) for t, x, top in zip(chosen.tolist(), lp, tops)]

    def prompt_logprobs(
        self, logits: torch.Tensor, idx: torch.Tensor, lens: list[int], n_top: int
    ) -> list[list[TokenLogprob]]:
        """Per row, a record for each prompt token (None for the first): from the prefill logits."""
        L = idx.size(1)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position p predicts token p + 1
        out = []
        for r, n in enumerate(lens):
            first = L - n
            recs = [TokenLogprob(int(idx[r, first]), self.token_text(int(idx[r, first])), None)]
            if n > 1:
                recs += self.logprob_records(logp[r, first : L - 1], idx[r, first + 1 :], n_top)
            out.append(recs)
        return out

    def prefill(self, prompt_ids: list[list[int]], total: int, want_all_logits: bool):
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
        logits, _ = self.forward(
            idx,
            position_ids=None if positions is None else positions[:, :L],
            attention_mask=None if mask is None else mask[:, :L],
            kv_cache=cache,
            logits_to_keep=0 if want_all_logits else 1,
        )
        return logits, idx, positions, mask, cache

    @torch.inference_mode()
    def _decode(self, rows: list[Row], params: SamplingParams) -> Iterator[None]:
        """Prefill, then decode one token per step for every row; yields after each step."""
        L = max(len(r.prompt_ids) for r in rows)
        total = L + params.max_tokens
        logits, idx, positions, mask, cache = self.prefill([r.prompt_ids for r in rows], total, params.echo)
        if params.echo:
            for r, recs in zip(
                rows, self.prompt_logprobs(logits, idx, [len(r.prompt_ids) for r in rows], params.logprobs or 0)
            ):
                r.prompt_logprobs = recs
        if params.max_tokens == 0:
            return
        last = logits[:, -1]  # (B, V)

        rng = random.Random(params.seed)  # one uniform per row and step (None: seeded from the OS)
        controls = None if params.greedy else SamplingRows.of([params] * len(rows), self.device)
        seen, counts, history = penalty_state(
            params, [(r.prompt_ids, ()) for r in rows], self.config.vocab_size, self.device
        )

        for t in range(params.max_tokens):
            x = apply_penalties(last, params, seen, counts, history)
            if params.greedy:
                nxt = x.max(dim=-1).indices  # faster than argmax on CPU
            else:
                nxt = sample(x, controls, lambda idx: [rng.random() for _ in idx])
            recs = None
            if params.logprobs is not None:
                recs = self.logprob_records(torch.log_softmax(last, dim=-1), nxt, params.logprobs)
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
            logits, _ = self.forward(
                nxt[:, None],
                position_ids=None if positions is None else positions[:, s : s + 1],
                attention_mask=None if mask is None else mask[:, : s + 1],
                kv_cache=cache,
                logits_to_keep=1,
            )
            last = logits[:, -1]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype from its name (None or "auto": keep the saved one)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _unwrap_tokenizer(tokenizer):
    """(tokenizers.Tokenizer, eos id or None) from a Tokenizer, an HF fast tokenizer or a path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)), None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend, getattr(tokenizer, "eos_token_id", None)
    raise TypeError(
        f"tokenizer must be a tokenizers.Tokenizer, a PreTrainedTokenizerFast or a path, got {type(tokenizer).__name__}"
    )
