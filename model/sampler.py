"""Sampled decoding at about the cost of greedy: one token per row from temperature, top_k, top_p and min_p, with
Hugging Face's semantics and no sort of the vocabulary.

    >>> rows = SamplingRows.of([params] * B, device)             # the rows' controls, one tensor
    >>> rng = random.Random(params.seed)
    >>> nxt = sample(logits, rows, lambda idx: [rng.random() for _ in idx])   # (B,) token ids

How: each row draws two tokens by inverse CDF, with two uniforms from its own random stream, from a superset of
its kept set (top_k's set exactly, min_p's widened by MARGIN), then checks only the drawn tokens: the probability
mass above a token decides top_p, its own probability min_p (a few float passes over the vocabulary, no sort). The
row takes the first token its kept set holds: rejection sampling, an exact draw from the kept set (FlashInfer's
sort-free sampler works alike); the second draw covers the ~1 - top_p of rows whose first is rejected. A row with
both rejected draws again above them (every kept token lies above), one row at a time.

Why it is HF's kept set: TopK keeps every token >= the k-th largest logit, which the proposal uses as is. TopP keeps
a token when the mass at or below it (in its ascending sort) is > 1 - top_p, that is when the mass above it is
< top_p, and it always keeps the top token; MinP keeps a token when its probability is >= min_p times the top one's.
Those compare sums to thresholds, so a decision within MARGIN of its threshold, where float rounding could tip
HF's the other way, or a group of equal logits that the top_p cut splits (HF keeps those its sort happens to put
last), is handed to the reference (`model.sampling.filter_logits`, HF's code) for that row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model.sampling import SamplingParams, filter_logits

# A decision this close to its threshold (in probability) goes to the reference: float32 rounding of a softmax over a
# few thousand tokens moves a sum by ~1e-6 (HF's and ours), ten times less.
MARGIN = 1e-5
DRAWS = 2  # tokens each row draws at once
MAX_DRAWS = 16  # then a row's kept set comes from the reference (each rejection lifts the floor: rarely reached)
INF = float("inf")

# row indices -> a uniform in [0, 1) for each, in order, from the row's own stream (a repeated index: the next one)
Uniforms = Callable[[list[int]], list[float]]


class SamplingRows:
    """Each row's sampling controls: the params (for the reference) and, from one (N, 6) float32 tensor (one copy
    per step), (N, 1) columns of its temperature, top_k and the thresholds the sampler compares with."""

    def __init__(self, params: Sequence[SamplingParams], controls: torch.Tensor):
        self.params, self.controls = list(params), controls
        self.top_k_on = any(p.top_k for p in self.params)
        self.top_p_on = any(p.top_p < 1 for p in self.params)
        self.min_p_on = any(p.min_p > 0 for p in self.params)

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device) -> SamplingRows:
        values = [
            (
                p.temperature,
                p.top_k,
                p.top_p - MARGIN if p.top_p < 1 else INF,  # kept by top_p for sure below this mass (1 = off: all)
                p.top_p + MARGIN if p.top_p < 1 else INF,  # dropped for sure from this mass on
                p.min_p * (1 + MARGIN),  # kept by min_p for sure from this probability ratio to the top token's on
                p.min_p * (1 - MARGIN),  # dropped for sure below it
            )
            for p in params
        ]
        return cls(params, torch.tensor(values, dtype=torch.float32, device=device))

    def __getitem__(self, i: int) -> SamplingRows:
        """Row i alone."""
        return SamplingRows([self.params[i]], self.controls[i : i + 1])

    # the columns, each (N, 1)
    temperature = property(lambda self: self.controls[:, 0:1])
    top_k = property(lambda self: self.controls[:, 1:2])  # 0 = off
    top_p_keep = property(lambda self: self.controls[:, 2:3])
    top_p_drop = property(lambda self: self.controls[:, 3:4])
    min_p_keep = property(lambda self: self.controls[:, 4:5])
    min_p_drop = property(lambda self: self.controls[:, 5:6])


def sample(logits: torch.Tensor, rows: SamplingRows, uniforms: Uniforms) -> torch.Tensor:
    """One token id per row of logits (N, V), drawn from its kept set; (N,) long.

    Each row draws DRAWS tokens at once (rejection takes the first its kept set holds), so that the second covers
    the ~1 - top_p of rows whose first is rejected. A row's token depends only on its logits, its controls and its
    uniforms (never on the other rows), so a seeded request draws the same tokens alone and in any batch."""
    x, p = _scaled(logits, rows)
    w, total, mass_k = _proposal(x, p, rows)
    j = _draw(w, _uniforms(uniforms, [i for i in range(x.size(0)) for _ in range(DRAWS)], x.device))  # (N, DRAWS)
    if not (rows.top_p_on or rows.min_p_on):  # w is the kept set
        return j[:, 0]
    ok, no = _judge(x, p, total, mass_k, j, rows)
    first_ok = ok[:, 0] | (no[:, 0] & ok[:, 1])
    tokens = torch.where(ok[:, 0], j[:, 0], j[:, 1])
    if bool(first_ok.all()):
        return tokens
    for r in (~first_ok).nonzero()[:, 0].tolist():  # a few rows now and then: one by one
        one = slice(r, r + 1)
        mass = (total[one], mass_k[one])
        tokens[r] = _settle(x[one], p[one], mass, w[one], j[one], ok[one], no[one], rows[r], uniforms, r)
    return tokens


def _settle(
    x: torch.Tensor,
    p: torch.Tensor,
    mass: tuple[torch.Tensor, torch.Tensor],
    w: torch.Tensor,
    j: torch.Tensor,
    ok: torch.Tensor,
    no: torch.Tensor,
    rows: SamplingRows,
    uniforms: Uniforms,
    r: int,
) -> torch.Tensor:
    """The token of one row (1, V) whose draws j (1, n) did not settle it: the first one its kept set holds, else a
    new draw. Draws dropped for sure (no) lift the floor of new draws above them; an unsure one is decided by the
    reference's kept set, which then decides every later draw."""
    kept = None
    for attempt in range(MAX_DRAWS + 1):
        for c in range(j.size(1)):
            if kept is None and (attempt == MAX_DRAWS or not (ok[0, c] or no[0, c])):
                kept = _reference(x[0], rows.params[0])
            if ok[0, c] if kept is None else kept[j[0, c]]:
                return j[0, c]
        if kept is not None:  # draw from the kept set itself
            return _draw(p * kept, _uniforms(uniforms, [r], x.device))[0, 0]
        w = w.masked_fill(x <= x.gather(1, j).amax(), 0.0)  # the draws and every token below them are out
        j = _draw(w, _uniforms(uniforms, [r], x.device))
        ok, no = _judge(x, p, *mass, j, rows, both=True)
    raise AssertionError("unreachable: the reference decides the last attempt")


def kept_mask(logits: torch.Tensor, rows: SamplingRows, chunk: int = 64) -> torch.Tensor:
    """(N, V) bool: the tokens `sample` may return, each judged as a drawn token is (O(V^2) work: for tests)."""
    x, p = _scaled(logits, rows)
    _, total, mass_k = _proposal(x, p, rows)
    ids = torch.arange(x.size(1), device=x.device).expand_as(x)
    judged = (_judge(x, p, total, mass_k, j, rows, both=True) for j in ids.split(chunk, dim=1))
    ok, no = (torch.cat(t, dim=1) for t in zip(*judged))
    if rows.top_k_on:  # _judge takes top_k's set as given
        k = rows.top_k.long().clamp(max=x.size(-1))
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, -INF)
        ok = ok & (x >= kth)
    unsure = ~(ok | no)
    for r in unsure.any(dim=1).nonzero()[:, 0].tolist():
        ok[r] = _reference(x[r], rows.params[r])
    return ok


def _scaled(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled logits x (N, V), divided as HF's TemperatureLogitsWarper divides, and softmax(x)."""
    x = logits.float() / rows.temperature
    return x, x.softmax(dim=-1)


def _proposal(x: torch.Tensor, p: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, ...]:
    """Weights to draw from (N, V): p on top_k's set (HF's TopK: every token >= the k-th logit), less the tokens
    min_p drops for sure; the mass of all tokens (N, 1), 1 but for rounding; and of top_k's set, which top_p
    filters (in HF's order)."""
    w = p
    if rows.top_k_on:
        k = rows.top_k.long().clamp(max=x.size(-1))
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, -INF)
        w = p.masked_fill(x < kth, 0.0)
    total = p.sum(dim=-1, keepdim=True)
    mass_k = w.sum(dim=-1, keepdim=True) if w is not p else total
    if rows.min_p_on:
        w = w.masked_fill(p < rows.min_p_drop * p.amax(dim=-1, keepdim=True), 0.0)
    return w, total, mass_k


def _uniforms(uniforms: Uniforms, idx: list[int], device) -> torch.Tensor:
    """(n,) float32 uniforms for rows idx, at most 1 - 2**-23: then u * total < total in float32 too."""
    return torch.tensor([min(u, 1 - 2**-23) for u in uniforms(idx)], dtype=torch.float32, device=device)


def _draw(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: for each row of weights w (N, V) and uniform of u (N, n) the token where the weights' running sum
    passes u * their total; (N, n)."""
    cdf = w.cumsum(dim=-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # as torch.multinomial refuses them, not a wrong id
        raise RuntimeError("sampling: a row's probabilities are NaN, infinite or all zero (non-finite logits?)")
    return torch.searchsorted(cdf, u.view(w.size(0), -1) * total, right=True)  # tokens of positive weight


def _judge(
    x: torch.Tensor,
    p: torch.Tensor,
    total: torch.Tensor,
    mass_k: torch.Tensor,
    j: torch.Tensor,
    rows: SamplingRows,
    both: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether tokens j (N, n), inside top_k's set, are kept by top_p and min_p: (kept for sure, dropped for sure);
    the second only when some token is not kept for sure (or `both`)."""
    xj, pj = x.gather(1, j), p.gather(1, j)
    ok = torch.ones_like(j, dtype=torch.bool)
    if rows.top_p_on:
        # masses by one pass of float ops (no bool tensors: slower on CPU): with s = sign(x - xj), exact in float,
        # sum(p * s) = above - below and sum(p * |s|) = above + below, where above (below) is the mass of the
        # tokens whose logit is greater (less) than j's
        ps = (x[:, None, :] - xj[:, :, None]).sign_().mul_(p[:, None, :])  # (N, n, V)
        diff, both_sides = ps.sum(dim=-1), ps.abs_().sum(dim=-1)
        # the mass above the last of j's equal logits (HF's order among them): all but the mass below, less j's own
        ok = total - pj - (both_sides - diff) / 2 < rows.top_p_keep * mass_k  # j and its equal logits are kept
    if rows.min_p_on:
        top = xj == x.amax(dim=-1, keepdim=True)  # the top token is kept whatever min_p is
        ratio = pj / p.amax(dim=-1, keepdim=True)
        ok = ok & (top | (ratio >= rows.min_p_keep))
    no = torch.zeros_like(ok)
    if not both and bool(ok.all()):
        return ok, no
    if rows.top_p_on:  # none of j's equal logits is kept (the top one always is: the mass above it is 0)
        no = (both_sides + diff) / 2 >= rows.top_p_drop * mass_k
    if rows.min_p_on:
        no = no | (~top & (ratio < rows.min_p_drop))
    return ok, no


def _reference(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF's kept set for one row of temperature-scaled logits (V,): bool (V,)."""
    return filter_logits(x[None], params)[0] > -INF
