"""Log-likelihood scoring for lm-eval's `loglikelihood` requests (the engine's `loglikelihood` calls this).

    >>> loglikelihood(model, [([eos, *context_ids], continuation_ids)], batch_size=8, kv_cache=engine.kv_cache)
    [(-12.3, False)]

The output head runs only where a continuation token is predicted; requests that share a context (the
choices of a multiple-choice item) run the context once. The held-out rolling pass is in
model.transformer (GPT.hidden_states + GPT.logits) and pipelines/evaluate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from model.sampling import check_param
from model.transformer import GPT, KVCache


@torch.inference_mode()
def loglikelihood(
    model: GPT, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, kv_cache: Callable[[int], KVCache]
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
            raise ValueError(f"request {i}: context + continuation is {n + 1} tokens, more than block_size + 1 = {model.config.block_size + 1}")
    singles = list(range(len(requests)))
    if batch_size > 1:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        singles = [m[0] for m in groups.values() if len(m) == 1]
        chunks = [m[s : s + batch_size] for m in groups.values() if len(m) > 1 for s in range(0, len(m), batch_size)]
        for batch in _pack_shared_contexts(requests, chunks, batch_size, model.config.block_size):
            members = [i for m in batch for i in m]
            for i, result in zip(members, _shared_context_loglikelihood(model, [[requests[i] for i in m] for m in batch], kv_cache)):
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

def _pack_shared_contexts(requests, chunks: list[list[int]], batch_size: int, block_size: int) -> Iterator[list[list[int]]]:
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
            _right_padded([c[:-1] for c in conts], device), position_ids=ctx_len + slots[:, :T], kv_cache=cache,
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
