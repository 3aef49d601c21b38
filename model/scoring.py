"""Log-likelihood scoring for lm-eval's `loglikelihood` requests (the engine's `loglikelihood` calls this).

    >>> loglikelihood(model, [([eos, *context_ids], continuation_ids)], batch_size=8, kv_cache=engine.kv_cache)
    [(-12.3, False)]

The output head runs only where a continuation token is predicted; requests that share a context (the
choices of a multiple-choice item) run the context once. `rolling_loglikelihood` scores whole documents with
sliding windows: the evaluate stage's held-out bits per byte and lm-eval's `loglikelihood_rolling`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from model.sampling import check_param
from model.transformer import GPT, KVCache


@torch.inference_mode()
def loglikelihood(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    kv_cache: Callable[[int], KVCache],
) -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): (sum of the continuation's logprobs given the
    context, whether greedy decoding would have produced the continuation). lm-eval's contract.

    With batch_size > 1, requests that share a context (the choices of a multiple-choice item) are
    scored together: the context runs once into the KV cache, then every continuation from it, several
    items per batch. The rest are batched, longest first, right-padded. Either way the output head runs
    only where a continuation token is predicted. kv_cache(rows) hands out a reset cache (the engine's, reused).
    """
    device = next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for i, (ctx, cont) in enumerate(requests):
        check_param(len(ctx) > 0, "context_ids", "non-empty (start with an end-of-text token)", list(ctx))
        check_param(len(cont) > 0, "continuation_ids", "non-empty", list(cont))
        n = len(ctx) + len(cont) - 1
        if n > model.config.block_size:
            raise ValueError(
                f"request {i}: context + continuation is {n + 1} tokens, more than block_size + 1 = {model.config.block_size + 1}"
            )
    singles = list(range(len(requests)))
    if batch_size > 1:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        singles = [m[0] for m in groups.values() if len(m) == 1]
        chunks = [m[s : s + batch_size] for m in groups.values() if len(m) > 1 for s in range(0, len(m), batch_size)]
        for batch in _pack_shared_contexts(requests, chunks, batch_size, model.config.block_size):
            members = [i for m in batch for i in m]
            for i, result in zip(
                members, _shared_context_loglikelihood(model, [[requests[i] for i in m] for m in batch], kv_cache)
            ):
                out[i] = result
    order = sorted(singles, key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        seqs = [list(requests[i][0]) + list(requests[i][1]) for i in chunk]
        hidden = model.hidden_states(_right_padded([q[:-1] for q in seqs], device))
        # the head only where a continuation token is predicted: position p predicts token p + 1
        spans = [hidden[r, len(requests[i][0]) - 1 : len(seqs[r]) - 1] for r, i in enumerate(chunk)]
        for i, result in zip(chunk, _score_continuations(model, spans, [requests[i][1] for i in chunk])):
            out[i] = result
    return out


def _pack_shared_contexts(
    requests, chunks: list[list[int]], batch_size: int, block_size: int
) -> Iterator[list[list[int]]]:
    """Batches of same-context chunks: at most batch_size continuations, and the longest context plus the
    longest continuation within the model's context (they share cache slots). Longest contexts first, so
    similar lengths share a batch."""
    batch, rows, ctx_len, cont_len = [], 0, 0, 0
    for chunk in sorted(chunks, key=lambda m: -len(requests[m[0]][0])):
        c, t = len(requests[chunk[0]][0]), max(len(requests[i][1]) for i in chunk) - 1
        if batch and (rows + len(chunk) > batch_size or max(ctx_len, c) + max(cont_len, t) > block_size):
            yield batch
            batch, rows, ctx_len, cont_len = [], 0, 0, 0
        batch.append(chunk)
        rows, ctx_len, cont_len = rows + len(chunk), max(ctx_len, c), max(cont_len, t)
    if batch:
        yield batch


def _shared_context_loglikelihood(model: GPT, groups, kv_cache: Callable[[int], KVCache]) -> list[tuple[float, bool]]:
    """loglikelihood for groups of requests that share a context, in order: the contexts run once (right-padded
    together) into the KV cache, each is copied to the rows of its continuations, then every continuation
    runs from there at its own positions, with the context padding masked out."""
    device = next(model.parameters()).device
    ctxs = [list(g[0][0]) for g in groups]
    conts = [list(c) for g in groups for _, c in g]
    owner = [k for k, g in enumerate(groups) for _ in g]  # context of each continuation row
    L = max(len(c) for c in ctxs)
    cache = kv_cache(len(conts))
    hidden = model.hidden_states(_right_padded(ctxs, device), kv_cache=cache)
    # a context's last position predicts the first token of each of its continuations
    first = [hidden[k, len(c) - 1 : len(c)] for k, c in enumerate(ctxs)]
    cache.reorder(torch.tensor(owner, device=device))
    spans = [first[k] for k in owner]
    T = max(len(c) for c in conts) - 1
    if T > 0:
        ctx_len = torch.tensor([len(ctxs[k]) for k in owner], device=device)[:, None]
        slots = torch.arange(L + T, device=device)[None, :]
        hidden = model.hidden_states(
            _right_padded([c[:-1] for c in conts], device),
            position_ids=ctx_len + slots[:, :T],
            kv_cache=cache,
            attention_mask=(slots < ctx_len) | (slots >= L),  # the context's real tokens, then the continuation
        )
        spans = [torch.cat([first[k], hidden[r, : len(conts[r]) - 1]]) for r, k in enumerate(owner)]
    return _score_continuations(model, spans, conts)


def _right_padded(seqs: list[list[int]], device) -> torch.Tensor:
    """(B, longest) token ids on device; right padding never changes earlier positions of a causal model."""
    idx = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for r, q in enumerate(seqs):
        idx[r, : len(q)] = torch.tensor(q, dtype=torch.long)
    return idx.to(device)


def _score_continuations(model: GPT, spans: list[torch.Tensor], continuations) -> list[tuple[float, bool]]:
    """spans[r]: the hidden states (len(cont), n_embd) that predict continuations[r] -> (logprob sum, greedy?)."""
    device = next(model.parameters()).device
    logp = torch.log_softmax(model.logits(torch.cat(spans)), dim=-1)
    target = torch.tensor([t for c in continuations for t in c], device=device)
    token_lp = logp.gather(1, target[:, None]).squeeze(1)
    hit = logp.argmax(-1) == target
    out, at = [], 0
    for c in continuations:
        n = len(c)
        out.append((token_lp[at : at + n].sum().item(), bool(hit[at : at + n].all())))
        at += n
    return out


def rolling_windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over targets t[0..n) of x = [prefix] + t, as (input_start, input_end, n_scored) in x's indices.

    The window feeds x[input_start:input_end] and scores its last n_scored predictions (targets
    t[input_end - n_scored .. input_end)); every target is scored exactly once.

        >>> rolling_windows(10, block_size=4, stride=2)
        [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    """
    if n <= 0:
        return []
    stride = min(stride, block_size)
    out, b = [], min(n, block_size)
    out.append((0, b, b))
    while b < n:
        a, b = b, min(n, b + stride)
        out.append((b - block_size, b, b - a))
    return out


@torch.inference_mode()
def rolling_loglikelihood(
    model: GPT,
    docs: Sequence[Sequence[int]],
    prefix_id: int,
    stride: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Sum of log p(t_i | preceding tokens) over each document, with sliding windows (natural log).

    Windows from all documents are sorted by length and run `batch_size` at a time (right padding never
    changes earlier positions in a causal model). progress(done, total), if given, is called after each batch.
    """
    block_size = model.config.block_size
    stride = stride or block_size
    device = next(model.parameters()).device
    jobs = []  # (doc index, x, start, end, n_scored)
    xs = [[prefix_id, *map(int, d)] for d in docs]
    for i, x in enumerate(xs):
        for start, end, n_scored in rolling_windows(len(x) - 1, block_size, stride):
            jobs.append((i, start, end, n_scored))
    jobs.sort(key=lambda j: j[1] - j[2])  # longest windows first: fewer padded positions per batch
    sums = [0.0] * len(docs)
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        T = max(end - start for _, start, end, _ in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt = torch.full((len(chunk), T), -100, dtype=torch.long)  # -100: not scored
        for r, (i, start, end, n_scored) in enumerate(chunk):
            x = xs[i]
            idx[r, : end - start] = torch.tensor(x[start:end])
            tgt[r, end - start - n_scored : end - start] = torch.tensor(x[end - n_scored + 1 : end + 1])
        hidden = model.hidden_states(idx.to(device))
        tgt = tgt.to(device)
        scored = tgt != -100
        # the output head only at scored positions: windows after a document's first overlap their predecessor
        nll = F.cross_entropy(model.logits(hidden[scored]), tgt[scored], reduction="none")
        rows = scored.nonzero()[:, 0]
        per_row = torch.zeros(len(chunk), device=device, dtype=nll.dtype).index_add_(0, rows, nll)
        for r, row in enumerate(per_row.tolist()):
            sums[chunk[r][0]] -= row
        if progress is not None:
            progress(min(s + batch_size, len(jobs)), len(jobs))
    return sums


def perplexity_summary(logliks: Sequence[float], n_tokens: int, n_bytes: int) -> dict:
    """loss (nats/token), ppl and bits per byte from summed log-likelihoods."""
    total = -float(sum(logliks))
    loss = total / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": total / math.log(2) / max(n_bytes, 1)}
