"""Deterministic beam search over the engine's KV cache, with Hugging Face's length penalty and early stop.

>>> engine.generate(["To be"], SamplingParams(max_tokens=8, temperature=0, num_beams=4, n=2))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from model.config import GPTConfig
from model.sampling import SamplingParams, apply_penalties, find_stop, penalty_state
from model.sequence import Completion


class Engine(Protocol):
    """What beam search needs of the generation engine (model/engine.py's Engine, which calls it)."""

    config: GPTConfig
    device: torch.device
    forward: Callable[..., tuple[torch.Tensor, object]]  # (ids, kv_cache=, logits_to_keep=) -> (logits, _)

    def decode(self, ids: list[int]) -> str: ...
    def stop_ids(self, params: SamplingParams) -> set[int]: ...
    def kv_cache(self, batch_size: int) -> object: ...
    def prefill(self, prompt_ids: list[list[int]], total: int, want_all_logits: bool) -> tuple: ...
    def prompt_logprobs(self, logits: torch.Tensor, idx: torch.Tensor, lens: list[int], n_top: int) -> list: ...


Hypothesis = tuple[float, float, list[int], str, str]  # (normalized score, sum of logprobs, ids, text, finish reason)


def normalized(score: float, length: int, length_penalty: float) -> float:
    """Hugging Face's beam score: sum of logprobs / length ** length_penalty."""
    return score / (max(length, 1) ** length_penalty)


def step_candidates(
    engine: Engine,
    beams: list[list[int]],
    top_scores: list[float],
    top_idx: list[int],
    params: SamplingParams,
    stop_ids: set[int],
    finished: list[Hypothesis],
):
    """Walk the 2K best (beam, token) candidates in order: a stop token or stop string ends a hypothesis (kept if
    it ranks among the top K), others extend a live beam until K are kept. Returns (beam, token, score) lists."""
    K, V = params.num_beams, engine.config.vocab_size
    keep_beam, keep_tok, keep_score = [], [], []
    for rank, (s, j) in enumerate(zip(top_scores, top_idx)):
        if s == float("-inf"):
            break
        b, tok = divmod(j, V)
        ids = beams[b] + [tok]
        text, reason = None, None
        if tok in stop_ids:
            text, reason = engine.decode(ids[:-1]), "stop"
        elif params.stop:
            decoded = engine.decode(ids)
            cut = find_stop(decoded, params.stop)
            if cut is not None:
                text, reason = decoded[:cut], "stop"
        if reason is not None:
            if rank < K:
                finished.append((normalized(s, len(ids), params.length_penalty), s, ids, text, reason))
            continue
        keep_beam.append(b), keep_tok.append(tok), keep_score.append(s)
        if len(keep_beam) == K:
            break
    return keep_beam, keep_tok, keep_score


@torch.inference_mode()
def beam_search(engine: Engine, index: int, prompt_ids: list[int], params: SamplingParams) -> list[Completion]:
    """Deterministic beam search for one prompt; returns the best n hypotheses."""
    K, L, V = params.num_beams, len(prompt_ids), engine.config.vocab_size
    engine.kv_cache(K)  # make room for K rows before the prefill (which uses row 0)
    logits, idx, _, _, cache = engine.prefill([prompt_ids], L + params.max_tokens, params.echo)
    prompt_lp = engine.prompt_logprobs(logits, idx, [L], 0)[0] if params.echo else None
    for tensor in cache.k + cache.v:
        tensor[1:K, :, :L] = tensor[0:1, :, :L]
    stop_ids = engine.stop_ids(params)
    beams: list[list[int]] = [[]]  # generated ids per live beam
    scores = torch.zeros(1, device=engine.device)
    last = logits[:, -1]  # (live beams, V)
    finished: list[Hypothesis] = []

    for t in range(params.max_tokens):
        seen, counts, history = penalty_state(params, [(prompt_ids, ids) for ids in beams], V, engine.device)
        logp = torch.log_softmax(apply_penalties(last, params, seen, counts, history), dim=-1)
        cand = (scores[:, None] + logp).view(-1)
        top_scores, top_idx = cand.topk(min(2 * K, cand.numel()))
        keep_beam, keep_tok, keep_score = step_candidates(
            engine, beams, top_scores.tolist(), top_idx.tolist(), params, stop_ids, finished
        )
        if not keep_beam:
            break
        beams = [beams[b] + [tok] for b, tok in zip(keep_beam, keep_tok)]
        scores = torch.tensor(keep_score, device=engine.device)
        if t == params.max_tokens - 1:
            break
        # HF's early stop: K finished and no live beam can beat the worst of the best K
        if len(finished) >= K:
            worst = sorted(f[0] for f in finished)[-K]
            if normalized(keep_score[0], len(beams[0]), params.length_penalty) <= worst:
                beams = []
                break
        cache.reorder(torch.tensor(keep_beam, device=engine.device))
        logits, _ = engine.forward(
            torch.tensor(keep_tok, device=engine.device)[:, None], kv_cache=cache, logits_to_keep=1
        )
        last = logits[:, -1]
    for ids, s in zip(beams, scores.tolist()):
        finished.append((normalized(s, len(ids), params.length_penalty), s, ids, engine.decode(ids), "length"))
    finished.sort(key=lambda f: -f[0])
    return [
        Completion(
            index=index,
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_token_ids=list(prompt_ids),
            prompt_logprobs=prompt_lp,
            cumulative_logprob=s,
        )
        for _, s, ids, text, reason in finished[: params.n]
    ]
