"""Sampled decoding at about the cost of greedy: one token per row from temperature, top_k, top_p and min_p, with
Hugging Face's semantics and no sort of the vocabulary.

    >>> rows = SamplingRows.of([params] * B, device)             # each row's controls as (B, 1) tensors
    >>> rng = random.Random(params.seed)
    >>> nxt = sample(logits, rows, lambda idx: [rng.random() for _ in idx])   # (B,) token ids

How: each row draws one token by inverse CDF, with one uniform from its own random stream, from a superset of
its kept set (top_k's set exactly, min_p's widened by MARGIN), then checks only the drawn token: the probability
mass above it decides top_p, its own probability decides min_p (two sums over the vocabulary, no sort). A rejected
token lifts the row's floor above it (every kept token lies above) and the row draws again; the token accepted is
an exact draw from the kept set (rejection sampling; FlashInfer's sort-free sampler works alike).

Why it is HF's kept set: TopK keeps every token >= the k-th largest logit, which the proposal uses as is. TopP keeps
a token when the mass at or below it (in its ascending sort) is > 1 - top_p, that is when the mass above it is
< top_p, and it always keeps the top token; MinP keeps a token when its probability is >= min_p times the top one's.
Those compare sums to thresholds, so a decision within MARGIN of its threshold, where float rounding could tip
HF's the other way, or a group of equal logits that the top_p cut splits (HF keeps those its sort happens to put
last), is handed to the reference (`model.sampling.filter_logits`, HF's code) for that row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.sampling import SamplingParams, filter_logits

# A decision this close to its threshold (in probability) goes to the reference: float32 rounding of a softmax over a
# few thousand tokens moves a sum by ~1e-6 (HF's and ours), ten times less.
MARGIN = 1e-5
MAX_DRAWS = 16  # then a row's kept set comes from the reference (each rejection lifts the floor: rarely reached)

Uniforms = Callable[[list[int]], list[float]]  # row indices -> one uniform in [0, 1) for each, from its own stream


@dataclass
class SamplingRows:
    """Each row's sampling controls, as (N, 1) tensors (and the params, for the reference)."""

    params: list[SamplingParams]
    temperature: torch.Tensor  # > 0
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # 1 = off
    min_p: torch.Tensor  # 0 = off

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device) -> SamplingRows:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        return cls(
            list(params),
            col([p.temperature for p in params], torch.float32),
            col([p.top_k for p in params], torch.long),
            col([p.top_p for p in params], torch.float32),
            col([p.min_p for p in params], torch.float32),
        )

    def __getitem__(self, idx: torch.Tensor) -> SamplingRows:
        return SamplingRows(
            [self.params[i] for i in idx.tolist()],
            self.temperature[idx],
            self.top_k[idx],
            self.top_p[idx],
            self.min_p[idx],
        )

    @property
    def top_k_on(self) -> bool:
        return any(p.top_k for p in self.params)

    @property
    def top_p_on(self) -> bool:
        return any(p.top_p < 1 for p in self.params)

    @property
    def min_p_on(self) -> bool:
        return any(p.min_p > 0 for p in self.params)


def sample(logits: torch.Tensor, rows: SamplingRows, uniforms: Uniforms) -> torch.Tensor:
    """One token id per row of logits (N, V), drawn from its kept set; (N,) long.

    A row's token depends only on its logits, its controls and its uniforms (never on the other rows), so a seeded
    request draws the same tokens alone and in any batch."""
    x, p = _scaled(logits, rows)
    w, zk, _ = _proposal(x, p, rows)
    j = _draw(w, _uniforms(uniforms, list(range(x.size(0))), x.device))  # (N, 1)
    if not (rows.top_p_on or rows.min_p_on):  # w is the kept set
        return j[:, 0]
    ok, no = _judge(x, p, zk, j, rows)
    if bool(ok.all()):
        return j[:, 0]
    return _settle(x, p, zk, w, j, ok, no, rows, uniforms)


def _settle(x, p, zk, w, j, ok, no, rows: SamplingRows, uniforms: Uniforms) -> torch.Tensor:
    """The tokens, once the rows whose draw j was not kept for sure (ok) are settled: a row dropped for sure (no)
    draws again above j; an unsure one takes the reference's kept set, where its j may stand."""
    tokens = j[:, 0].clone()
    idx = torch.arange(x.size(0), device=x.device)  # rows still drawing
    exact = torch.zeros_like(ok)  # w is the row's kept set itself (the reference's): any draw stands
    for attempt in range(MAX_DRAWS):
        unsure = ~(ok | no)
        if bool(unsure.any()):
            w = _exact(x, p, w, exact, rows, unsure)
            ok = ok | (unsure & (w.gather(1, j) > 0))
        again = ~ok[:, 0]
        if not bool(again.any()):
            break
        x, p, zk, w, exact, j, idx = (t[again] for t in (x, p, zk, w, exact, j, idx))
        rows = rows[again.nonzero()[:, 0]]
        w = w.masked_fill(~exact & (x <= x.gather(1, j)), 0.0)  # j and every token below it are out
        if attempt == MAX_DRAWS - 1:  # the reference decides for the rows still drawing
            w = _exact(x, p, w, exact, rows, torch.ones_like(exact))
        j = _draw(w, _uniforms(uniforms, idx.tolist(), x.device))
        tokens[idx] = j[:, 0]
        ok, no = _judge(x, p, zk, j, rows)
        ok = ok | exact
    return tokens


def kept_mask(logits: torch.Tensor, rows: SamplingRows, chunk: int = 64) -> torch.Tensor:
    """(N, V) bool: the tokens `sample` may return, each judged as a drawn token is (O(V^2) work: for tests)."""
    x, p = _scaled(logits, rows)
    _, zk, kth = _proposal(x, p, rows)
    ids = torch.arange(x.size(1), device=x.device).expand_as(x)
    ok, no = (torch.cat(t, dim=1) for t in zip(*(_judge(x, p, zk, j, rows) for j in ids.split(chunk, dim=1))))
    kept = ok & (x >= kth)  # _judge takes top_k's set as given
    unsure = ~(ok | no)
    for r in unsure.any(dim=1).nonzero()[:, 0].tolist():
        kept[r] = _reference(x[r], rows.params[r])
    return kept


def _scaled(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled logits x (N, V), divided as HF's TemperatureLogitsWarper divides, and softmax(x)."""
    x = logits.float() / rows.temperature
    return x, x.softmax(dim=-1)


def _proposal(x: torch.Tensor, p: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, ...]:
    """Weights to draw from (N, V): p on top_k's set, less the tokens min_p drops for sure; top_p's normaliser
    (N, 1): the mass of top_k's set, which top_p filters in HF's order; and the k-th logit (N, 1), -inf if off."""
    w, kth = p, torch.full_like(x[:, :1], float("-inf"))
    if rows.top_k_on:
        k = rows.top_k.clamp(max=x.size(-1))
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, float("-inf"))
        w = p.masked_fill(x < kth, 0.0)  # HF's TopK: ties with the k-th logit stay
    zk = w.sum(dim=-1, keepdim=True)
    if rows.min_p_on:
        w = w.masked_fill(p < rows.min_p * (1 - MARGIN) * p.amax(dim=-1, keepdim=True), 0.0)
    return w, zk, kth


def _uniforms(uniforms: Uniforms, idx: list[int], device) -> torch.Tensor:
    return torch.tensor(uniforms(idx), dtype=torch.float64, device=device)


def _draw(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: for each row the token where its weights' running sum passes u * total; (N, 1)."""
    cdf = w.cumsum(dim=-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # as torch.multinomial refuses them, not a wrong id
        raise RuntimeError("sampling: a row's probabilities are NaN, infinite or all zero (non-finite logits?)")
    v = torch.minimum((u[:, None] * total).to(cdf.dtype), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True)  # v < total: a token of positive weight


def _judge(
    x: torch.Tensor, p: torch.Tensor, zk: torch.Tensor, j: torch.Tensor, rows: SamplingRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether tokens j (N, n), inside top_k's set, are kept by top_p and min_p: (kept for sure, dropped for sure)."""
    xj, pj = x.gather(1, j), p.gather(1, j)
    ok = torch.ones_like(j, dtype=torch.bool)
    no = torch.zeros_like(ok)
    if rows.top_p_on:
        on = rows.top_p < 1
        higher = x[:, None, :] > xj[:, :, None]  # (N, n, V)
        above = torch.where(higher, p[:, None, :], 0.0).sum(dim=-1) / zk  # mass above j, in top_k's distribution
        ties = (x[:, None, :] == xj[:, :, None]).sum(dim=-1)
        last = above + (ties - 1) * pj / zk  # mass above the last of j's equal logits (HF's order among them)
        ok = ~on | (last < rows.top_p - MARGIN)  # every one of j's equal logits is kept
        no = on & (above >= rows.top_p + MARGIN)  # none is (above == 0: j is the top one, always kept)
    if rows.min_p_on:
        on = rows.min_p > 0
        top = xj == x.amax(dim=-1, keepdim=True)  # the top token's own probability: kept whatever min_p is
        ratio = pj / p.amax(dim=-1, keepdim=True)
        ok = ok & (~on | top | (ratio >= rows.min_p * (1 + MARGIN)))
        no = no | (on & ~top & (ratio < rows.min_p * (1 - MARGIN)))
    return ok, no


def _exact(
    x: torch.Tensor, p: torch.Tensor, w: torch.Tensor, exact: torch.Tensor, rows: SamplingRows, which: torch.Tensor
) -> torch.Tensor:
    """w with the rows in `which` (N, 1) set to p on the reference's kept set, and those rows marked exact."""
    w = w.clone()
    for r in (which[:, 0] & ~exact[:, 0]).nonzero()[:, 0].tolist():
        w[r] = p[r] * _reference(x[r], rows.params[r])
        exact[r] = True
    return w


def _reference(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF's kept set for one row of temperature-scaled logits (V,): bool (V,)."""
    return filter_logits(x[None], params)[0] > float("-inf")
