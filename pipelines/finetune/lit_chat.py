"""The finetune stage's LightningModule: the base (or its LoRA-wrapped form) trained on the assistant's tokens.

The optimisation is the train stage's (pipelines/common/training/lit.py); only the loss differs: a batch is
(inputs, targets) with IGNORE wherever the token is not the assistant's (pipelines/finetune/data.py), so
model.GPT's cross-entropy averages over the assistant's tokens alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from pipelines.common.training.lit import LitCausalLM, Optimization


class LitChat(LitCausalLM):
    def __init__(self, model: nn.Module, opt: Optimization, total_steps: int, wrapped: bool):
        super().__init__(model, opt, total_steps)
        # model/transformer.py runs inference (no grad) on fused copies of each layer's plain nn.Linear weights;
        # peft's LoRA layers are not plain linears, so a wrapped model validates on the training path
        self.wrapped = wrapped

    def batch_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch  # (B, T) inputs, (B, T) targets
        _, loss = self.model(x, y)
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        with torch.enable_grad() if self.wrapped else contextlib.nullcontext():
            return super().validation_step(batch, batch_idx).detach()

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
