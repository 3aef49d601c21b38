"""Held-out quality of a model on a test split: loss, perplexity and bits per byte with sliding windows.

The evaluate stage measures the new model with it, and register re-measures the champion with it when the
test split changed, so both numbers are comparable.

    >>> held_out(engine.model, docs, eot_id, n_bytes, stride=128, batch_size=16)
    {'test_loss': 1.33, 'test_ppl': 3.79, 'test_bpb': 1.92, 'test_tokens': 151234, 'test_bytes': 612345}
"""

from __future__ import annotations

from model.scoring import perplexity_summary, rolling_loglikelihood
from pipelines.common.progress import progress_bar

# Bumped whenever held_out's numbers change for the same model, data and stride: a champion scored by another
# version is scored again before it is compared (register)
SCORER = "held_out/1"


def held_out(
    model,
    docs: list[list[int]],
    prefix_id: int,
    n_bytes: int,
    stride: int | None,
    batch_size: int,
    desc: str | None = "held-out",
    cache: dict | None = None,
) -> dict:
    """test_loss (nats/token), test_ppl and test_bpb over every document, with sliding windows.

    `cache`, if given, receives {tuple(document ids): log-likelihood} (QuillLM's rolling_cache: lm-eval's
    perplexity task then reuses these numbers instead of computing the same windows again)."""
    logliks = rolling_loglikelihood(model, docs, prefix_id, stride, batch_size, progress=progress_bar(desc))
    if cache is not None:
        cache.update((tuple(d), ll) for d, ll in zip(docs, logliks))
    n_tokens = sum(len(d) for d in docs)
    s = perplexity_summary(logliks, n_tokens, n_bytes)
    return {
        "test_loss": s["loss"],
        "test_ppl": s["ppl"],
        "test_bpb": s["bpb"],
        "test_tokens": n_tokens,
        "test_bytes": n_bytes,
    }
