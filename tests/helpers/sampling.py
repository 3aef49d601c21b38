"""Hugging Face's sampling warpers, the reference that model/sampler.py's kept sets and draws and model/sampling.py's
filter_logits are held to, and batches of logits with per-row controls to hold them to."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model import SamplingParams


def hf_warped(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What `generate(do_sample=True)` samples from: its warpers, in its order (transformers' _get_logits_processor)."""
    x = TemperatureLogitsWarper(float(p.temperature))(None, logits)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    return x


# Logits on a coarse grid, so that equal logits are common (also at the top_p cut: a uniform row with top_p 0.5 cuts
# a tie group in two), and thresholds where sums land exactly on them (0.25, 0.5, 0.75 of a few equal tokens).
@st.composite
def batches(draw):
    n, vocab = draw(st.integers(1, 5)), draw(st.integers(1, 70))
    grid = draw(st.sampled_from([0.25, 0.5, 1.0, 3.0]))
    scale = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]))
    seed = draw(st.integers(0, 2**31))
    logits = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale / grid).round() * grid
    params = [
        SamplingParams(
            temperature=draw(st.sampled_from([0.5, 0.8, 1.0, 1.7])),
            top_k=draw(st.sampled_from([0, 0, 1, 2, 3, 10, 100])),
            top_p=draw(st.sampled_from([1.0, 0.95, 0.9, 0.75, 0.5, 0.25, 0.1]) | st.floats(0.01, 1.0)),
            min_p=draw(st.sampled_from([0.0, 0.0, 0.05, 0.1, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        )
        for _ in range(n)
    ]
    return logits, params
