"""The LightningModule of the train stage: model.GPT on windows of the token shards, next-token loss.

The optimisation (AdamW groups, the learning-rate schedule, clipping, the NaN stop, per-step seeds) is shared with
the finetune stage: pipelines/common/training/lit.py. model/ stays pure PyTorch.
"""

from __future__ import annotations

import torch

from model import GPT, GPTConfig
from pipelines.common.params import TrainParams
from pipelines.common.training.lit import LitCausalLM, NonFiniteLossError, Optimization
from pipelines.common.training.schedule import lr_at, param_groups  # noqa: F401 - benchmarks/train.py imports them here

__all__ = ["LitGPT", "NonFiniteLossError"]


class LitGPT(LitCausalLM):
    def __init__(self, config: GPTConfig, train: TrainParams, total_steps: int, bytes_per_token: float):
        super().__init__(GPT(config), Optimization.of(train), total_steps)
        self.config, self.train_params = config, train
        self.bytes_per_token = bytes_per_token  # of the val split, for bits per byte

    def batch_loss(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and their next tokens
        _, loss = self.model(x, y)
        return loss
