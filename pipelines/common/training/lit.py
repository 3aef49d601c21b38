"""The LightningModule both training stages build on: AdamW, the schedule, clipping, the NaN stop, run info.

A subclass gives the model and `batch_loss(batch)` (the train stage: next-token loss on windows; finetune: loss on
the assistant's tokens); everything about *optimising* it lives here. The learning rate is a pure function of the
optimizer step (schedule.lr_at), set on the optimizer before each step, so there is no scheduler state to save.
Dropout's random numbers are reseeded from (seed, step, rank) at every step, so they too are restored exactly by
restoring the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn as nn

from pipelines.common.training.schedule import lr_at, param_groups, step_seed


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the step is applied."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss is not finite ({loss}) at step {step}")
        self.step, self.loss = step, loss


@dataclass(frozen=True)
class Optimization:
    """AdamW (decoupled weight decay), linear warmup then cosine to min_lr, clipping, the seed, compile."""

    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # dropout draws derive from it
    compile: bool = False

    @classmethod
    def of(cls, section) -> Optimization:
        """From a params section holding these keys (train, finetune)."""
        return cls(**{name: getattr(section, name) for name in cls.__dataclass_fields__ if hasattr(section, name)})


class LitCausalLM(pl.LightningModule):
    """`model` trained on `batch_loss(batch)` for `total_steps` optimizer steps with `opt`."""

    def __init__(self, model: nn.Module, opt: Optimization, total_steps: int):
        super().__init__()
        self.model, self.opt = model, opt
        self.total_steps = total_steps  # the length the schedule is computed for
        self.run_info: dict = {}  # saved in every checkpoint under "quill" (the stage's resume info)
        self.last_grad_norm: torch.Tensor | None = None  # before clipping, of the last step
        self.step_loss: torch.Tensor | None = None  # mean over the last step's micro-batches
        self._loss_sum, self._loss_n = None, 0

    def batch_loss(self, batch) -> torch.Tensor:
        """The mean loss of one micro-batch (the subclass's job)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        # compiled in place, so state_dict keys (and checkpoints) are the same with or without compile
        if self.opt.compile and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self):
        o = self.opt
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(
            param_groups(self.model, o.weight_decay),
            lr=lr_at(0, o.lr, o.min_lr, o.warmup_steps, self.total_steps),
            betas=(o.beta1, o.beta2),
            fused=fused or None,
        )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # first micro-batch of a step
            torch.manual_seed(step_seed(self.opt.seed, self.global_step, self.global_rank))

    # Check for a NaN/inf loss at every micro-batch (a host sync), or only at `check_finite` calls
    # (log steps and before each checkpoint) while a device-side tensor remembers the first bad step.
    # None = defer on CUDA, where a sync per step would stall the GPU; check at once on a CPU.
    defer_finite_check: bool | None = None

    def on_fit_start(self) -> None:
        self._defer = self.defer_finite_check if self.defer_finite_check is not None else self.device.type == "cuda"
        self._first_bad = torch.tensor(-1, device=self.device)  # first step with a non-finite loss, or -1

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
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
        o = self.opt
        lr = lr_at(self.global_step, o.lr, o.min_lr, o.warmup_steps, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.step_loss = self._loss_sum / max(self._loss_n, 1)
        self._loss_sum, self._loss_n = None, 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # our own clipping, so the pre-clip global norm is kept for logging
        max_norm = self.opt.grad_clip or float("inf")
        strategy = self.trainer.strategy
        if hasattr(strategy, "model") and hasattr(strategy.model, "clip_grad_norm_"):  # FSDP shards the grads
            norm = strategy.model.clip_grad_norm_(max_norm)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.last_grad_norm = norm

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["quill"] = self.run_info

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("val_loss", loss, sync_dist=True, logger=False, prog_bar=True)
        return loss
