"""The train stage's curves and progress: pipelines/common/training/log.py's (the finetune stage logs the same
way). The progress of the optimizer steps is a tqdm bar on a terminal and a line per 10 % anywhere else.

    plots/train/train.csv   step, tokens, train_loss, lr, grad_norm, tokens_per_s, mfu
    plots/train/val.csv     step, tokens, val_loss, val_bpb
    plots/train/loss.png
"""

from __future__ import annotations

from pytorch_lightning.callbacks import ProgressBar

from pipelines.common.progress import on_terminal
from pipelines.common.training.log import StepLines, StepProgressBar, TrainLog, peak_flops

__all__ = ["StepLines", "StepProgressBar", "TrainLog", "peak_flops", "step_progress"]


def step_progress() -> ProgressBar:
    """The train stage's progress: a tqdm bar over optimizer steps on a terminal, lines anywhere else."""
    return StepProgressBar("train") if on_terminal() else StepLines("train")
