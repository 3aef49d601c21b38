"""Tiny GPT configs and models the model/ tests (and the attention plot's) build."""

import torch

from model import GPT, GPTConfig


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **{"vocab_size": 97, "block_size": 48, "n_embd": 32, **overrides})


def make_model(tie=True, n_kv_head=4, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset(
        "tiny", vocab_size=300, block_size=64, n_embd=32, n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=500.0
    )
    m = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm would show
        for name, p in m.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return m
