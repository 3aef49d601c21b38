"""The LightningModule around model.GPT: loss, AdamW groups, the learning-rate schedule, clipping, NaN stop.

model/ stays pure PyTorch; everything about *training* it lives here. The learning rate is a pure
function of the optimizer step (`lr_at`), set on the optimizer before each step, so there is no
scheduler state to save. Dropout's random numbers are reseeded from (seed, step, rank) at every
step, so they too are restored exactly by restoring the step.

    >>> lr_at(0, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    0.0001
"""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch

from model import GPT, GPTConfig
from pipelines.common.params import TrainParams


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the step is applied."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss is not finite ({loss}) at step {step}")
        self.step, self.loss = step, loss


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps` (step 0 gets lr/warmup_steps), then cosine from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices of linear layers; not norms, not embeddings (nor a tied head)."""
    no_decay = {id(model.model.embed_tokens.weight)}
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


class LitGPT(pl.LightningModule):
    def __init__(self, config: GPTConfig, train: TrainParams, total_steps: int, bytes_per_token: float):
        super().__init__()
        self.config, self.train_params = config, train
        self.total_steps = total_steps  # the length the schedule is computed for
        self.bytes_per_token = bytes_per_token  # of the val split, for bits per byte
        self.model = GPT(config)
        self.run_info: dict = {}  # saved in every checkpoint under "quill" (see pipelines/train/stage.py)
        self.last_grad_norm: torch.Tensor | None = None  # before clipping, of the last step
        self.step_loss: torch.Tensor | None = None  # mean over the last step's micro-batches
        self._loss_sum, self._loss_n = None, 0

    def configure_model(self) -> None:
        # compiled in place, so state_dict keys (and checkpoints) are the same with or without compile
        if self.train_params.compile and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self):
        t = self.train_params
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(
            param_groups(self.model, t.weight_decay),
            lr=lr_at(0, t.lr, t.min_lr, t.warmup_steps, self.total_steps),
            betas=(t.beta1, t.beta2),
            fused=fused or None,
        )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # first micro-batch of a step
            torch.manual_seed(step_seed(self.train_params.seed, self.global_step, self.global_rank))

    # Check for a NaN/inf loss at every micro-batch (a host sync), or only at `check_finite` calls
    # (log steps and before each checkpoint) while a device-side tensor remembers the first bad step.
    # None = defer on CUDA, where a sync per step would stall the GPU; check at once on a CPU.
    defer_finite_check: bool | None = None

    def on_fit_start(self) -> None:
        self._defer = self.defer_finite_check if self.defer_finite_check is not None else self.device.type == "cuda"
        self._first_bad = torch.tensor(-1, device=self.device)  # first step with a non-finite loss, or -1

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        _, loss = self.model(x, y)
        detached = loss.detach()
        bad = ~torch.isfinite(detached) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, self.global_step, self._first_bad)
        if not self._defer:
            self.check_finite()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_n += 1
        return loss

    def check_finite(self) -> None:
        """Raise NonFiniteLossError (on every rank at once) if any loss so far was NaN or infinite."""
        first_bad = int(self._first_bad.item())
        bad = first_bad >= 0
        if self.trainer.world_size > 1:  # all ranks stop together, or the others would hang in all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(first_bad if first_bad >= 0 else self.global_step, float("nan"))

    def on_before_optimizer_step(self, optimizer) -> None:
        t = self.train_params
        lr = lr_at(self.global_step, t.lr, t.min_lr, t.warmup_steps, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.step_loss = self._loss_sum / max(self._loss_n, 1)
        self._loss_sum, self._loss_n = None, 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # our own clipping, so the pre-clip global norm is kept for logging
        max_norm = self.train_params.grad_clip or float("inf")
        strategy = self.trainer.strategy
        if hasattr(strategy, "model") and hasattr(strategy.model, "clip_grad_norm_"):  # FSDP shards the grads
            norm = strategy.model.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.last_grad_norm = norm

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["quill"] = self.run_info

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        _, loss = self.model(x, y)
        self.log("val_loss", loss, sync_dist=True, logger=False, prog_bar=True)
        return loss
