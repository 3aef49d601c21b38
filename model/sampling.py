"""Sampling controls and what they do to a row's logits: penalties, bans, temperature and filters.

    >>> params = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, stop=["\\n\\n"])
    >>> probs = sampling_probs(apply_penalties(logits, params), params)   # (B, V)

Controls mean what they mean in the OpenAI API and Hugging Face `generate`; invalid values raise
ValueError naming the field, the allowed range and the value. Decoding draws with model/sampler.py, which never
sorts the vocabulary; `sampling_probs` here is the reference it is checked against (and falls back to).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
    logit_bias: dict[int, float] | None = None  # OpenAI: token id -> bias in [-100, 100] added to its logit

    def __post_init__(self):
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        check_param(_is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens", "an integer >= 0", self.max_tokens)
        check_param(
            _is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0", self.temperature
        )
        check_param(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 or -1 = off)", self.top_k)
        check_param(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        check_param(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        check_param(
            _is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "> 0",
            self.repetition_penalty,
        )
        check_param(
            _is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            "in [-2, 2]",
            self.presence_penalty,
        )
        check_param(
            _is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            "in [-2, 2]",
            self.frequency_penalty,
        )
        check_param(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        check_param(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "a list of token ids",
            self.stop_token_ids,
        )
        check_param(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        check_param(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        check_param(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
            "logprobs",
            "None or an integer in [0, 20]",
            self.logprobs,
        )
        check_param(_is_int(self.num_beams) and self.num_beams >= 1, "num_beams", "an integer >= 1", self.num_beams)
        check_param(
            _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
            "no_repeat_ngram_size",
            "an integer >= 0",
            self.no_repeat_ngram_size,
        )
        check_param(_is_num(self.length_penalty), "length_penalty", "a number", self.length_penalty)
        self.logit_bias = dict(self.logit_bias or {})
        check_param(
            all(_is_int(t) and t >= 0 and _is_num(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
            "logit_bias",
            "a map of token ids to numbers in [-100, 100]",
            self.logit_bias,
        )
        if self.num_beams > 1:
            check_param(
                self.temperature == 0,
                "temperature",
                "0 when num_beams > 1 (beam search is deterministic)",
                self.temperature,
            )
            check_param(self.n <= self.num_beams, "n", f"<= num_beams ({self.num_beams}) in beam search", self.n)
            check_param(self.logprobs is None, "logprobs", "None when num_beams > 1", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def check_param(ok: bool, name: str, what: str, value) -> None:
    """Raise ValueError naming the parameter, what it must be and the value it got."""
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen=None, counts=None, history=None) -> torch.Tensor:
    """Logit bias, penalties and bans on raw logits (B, V).

    seen: (B, V) bool, tokens in prompt or output (repetition_penalty); counts: (B, V) float, how
    often each token was generated (presence/frequency penalties); history: per row, prompt + output
    ids (no_repeat_ngram_size).
    """
    x = logits
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=x.device)
        bias = torch.tensor(list(params.logit_bias.values()), dtype=x.dtype, device=x.device)
        x = x.index_add(1, ids, bias.expand(x.size(0), -1))
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
    """The distribution a row is sampled from (B, V): temperature, then top_k, top_p, min_p.

    The reference the fast sampler (model/sampler.py) is checked against; it sorts the vocabulary."""
    return torch.softmax(filter_logits(logits / params.temperature, params), dim=-1)


def filter_logits(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top_k, top_p and min_p on temperature-scaled logits (B, V): Hugging Face's TopK, TopP and MinP warpers, in
    that order and computed as they compute them, so a group of equal logits that the top_p cut splits falls the
    same way (HF keeps those its ascending sort happens to put last)."""
    if params.top_k:
        kth = x.topk(min(params.top_k, x.size(-1)), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th logit stay
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1)  # ascending
        # drop a token when it and the tokens below it hold at most 1 - top_p of the mass (the top one always stays)
        drop = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        drop[..., -1:] = False
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = x.softmax(dim=-1)  # HF also exempts the top token, which this never drops (min_p <= 1)
        x = x.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in seq."""
    if len(seq) < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1 :])
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]


def penalty_state(params: SamplingParams, rows: Sequence[tuple[Sequence[int], Sequence[int]]], vocab_size: int, device):
    """(seen, counts, history) for apply_penalties, from each row's (prompt ids, generated ids).

    Each is None when its controls are off, so rows without penalties cost nothing.
    """
    seen = counts = history = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
        for b, (prompt, generated) in enumerate(rows):
            seen[b, list(prompt) + list(generated)] = True
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.zeros(len(rows), vocab_size, device=device)
        for b, (_, generated) in enumerate(rows):
            if generated:
                ids = torch.tensor(list(generated), device=device)
                counts[b].index_add_(0, ids, torch.ones(len(ids), device=device))
    if params.no_repeat_ngram_size:
        history = [list(prompt) + list(generated) for prompt, generated in rows]
    return seen, counts, history


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop string begins in text (searching from start), or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
