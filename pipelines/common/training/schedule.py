"""The learning rate as a pure function of the optimizer step, AdamW's parameter groups, and per-step seeds.

Nothing here holds state, so restoring the step restores the schedule and the dropout draws exactly.

    >>> lr_at(0, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    0.0001
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn as nn


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps` (step 0 gets lr/warmup_steps), then cosine from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: decay the weight matrices of linear layers; not norms, not
    embeddings (nor a head tied to one)."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, rest, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in no_decay else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for the torch generators at (step, rank): dropout is a pure function of the step."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
