"""What a training stage reports: loss, learning rate, gradient norm, tokens/s and MFU per step, val loss (and
bits per byte where the stage knows the bytes per token).

One Lightning callback keeps the history (saved in every checkpoint, so a resumed run's curves
continue), sends each row to MLflow as it comes, shows loss and tokens/s on the progress bar, and at
the end writes the same curves as CSV for `dvc plots show` and a PNG for MLflow. The progress of the
optimizer steps is a tqdm bar on a terminal and a line per 10 % anywhere else (`step_progress`).

    plots/<stage>/train.csv   step, tokens, train_loss, lr, grad_norm, tokens_per_s, mfu
    plots/<stage>/val.csv     step, tokens, val_loss, val_bpb
    plots/<stage>/loss.png
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from pipelines.common.atomic import atomic_file
from pipelines.common.progress import ProgressLines, on_terminal

TRAIN_COLUMNS = ("step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "mfu")
VAL_COLUMNS = ("step", "tokens", "val_loss", "val_bpb")

# Dense bf16 peak FLOP/s per device, for MFU (spec sheets; SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte of raw text from a mean cross-entropy in nats per token.

        bpb = loss / ln 2 * tokens_text / bytes,   tokens_text = tokens - docs (EOT tokens hold no bytes)

    It does not depend on the tokenizer, so models with different vocabularies compare.
    """
    return loss_nats / math.log(2) / bytes_per_token


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's bf16 peak, when training in mixed precision on a GPU we know; None otherwise (e.g. CPU)."""
    if device.type != "cuda" or precision not in ("bf16-mixed", "16-mixed"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class TrainLog(pl.Callback):
    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: float,
        log_every: int,
        bytes_per_token: float | None,  # of the val split; None: no val_bpb
        precision: str,
        mlflow_client=None,
        run_id: str | None = None,
    ):
        self.tokens_per_step, self.flops_per_token, self.log_every = tokens_per_step, flops_per_token, log_every
        self.bytes_per_token, self.precision = bytes_per_token, precision
        self.client, self.run_id = mlflow_client, run_id
        # saved in checkpoints
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.tokens_seen = 0
        self.timed_tokens = 0  # tokens of the steps whose time is measured (not the first of a session)
        self.train_seconds = 0.0
        # this session only
        self.peak: float | None = None
        self.world_size = 1
        self._last = 0.0
        self._window_tokens, self._window_seconds = 0, 0.0
        self._step_before = 0
        self._first_step = True
        self._val_started = 0.0

    # --- persistence (Lightning stores this in checkpoint["callbacks"]) --------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "tokens_seen": self.tokens_seen,
            "timed_tokens": self.timed_tokens,
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_rows, self.val_rows = list(state["train_rows"]), list(state["val_rows"])
        self.tokens_seen, self.timed_tokens = state["tokens_seen"], state["timed_tokens"]
        self.train_seconds = state["train_seconds"]

    # --- hooks -----------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = peak_flops(pl_module.device, self.precision)
        self.world_size = trainer.world_size
        self._last = time.perf_counter()
        self._first_step = True
        # rows past the resumed step were logged by an interrupted session; they are redone exactly
        step = trainer.global_step
        self.train_rows = [r for r in self.train_rows if r["step"] <= step]
        self.val_rows = [r for r in self.val_rows if r["step"] <= step]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._last += time.perf_counter() - self._val_started  # validation time is not training time
        loss = float(trainer.callback_metrics["val_loss"])
        row = {
            "step": trainer.global_step,
            "tokens": self.tokens_seen,
            "val_loss": loss,
            "val_bpb": bits_per_byte(loss, self.bytes_per_token) if self.bytes_per_token else None,
        }
        self.val_rows = [r for r in self.val_rows if r["step"] != row["step"]] + [row]
        self._send(row, ("val_loss", "val_bpb"), trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_before:  # mid gradient accumulation
            return
        now = time.perf_counter()
        step = trainer.global_step
        self.tokens_seen += self.tokens_per_step
        if self._first_step:  # start-up, compilation and warm-up are not throughput
            self._first_step = False
        else:
            self.train_seconds += now - self._last
            self.timed_tokens += self.tokens_per_step
            self._window_seconds += now - self._last
            self._window_tokens += self.tokens_per_step
        self._last = now
        if step % self.log_every and step != trainer.max_steps:
            return
        pl_module.check_finite()
        tokens_per_s = self._window_tokens / self._window_seconds if self._window_seconds else None
        self._window_tokens, self._window_seconds = 0, 0.0
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        grad_norm = pl_module.last_grad_norm
        row = {
            "step": step,
            "tokens": self.tokens_seen,
            "train_loss": float(pl_module.step_loss),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s),
        }
        self.train_rows.append(row)
        # plain floats (already synced once for this row), so the bar costs no extra device syncs
        bar = {"loss": row["train_loss"]} | ({"tok/s": tokens_per_s} if tokens_per_s is not None else {})
        pl_module.log_dict(bar, prog_bar=True, logger=False, rank_zero_only=True)
        self._send(row, ("train_loss", "lr", "grad_norm", "tokens_per_s", "mfu"), trainer)

    # --- summaries ---------------------------------------------------------------------------------

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s (all devices) over the devices' summed peak."""
        if self.peak is None or not tokens_per_s:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.world_size)

    @property
    def tokens_per_s(self) -> float | None:
        return self.timed_tokens / self.train_seconds if self.train_seconds else None

    def _send(self, row: dict, keys: tuple[str, ...], trainer) -> None:
        if self.client is None or not trainer.is_global_zero:
            return
        from mlflow.entities import Metric  # lazily: mlflow takes seconds to import; only rank 0 logs

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), stamp, row["step"]) for k in keys if row.get(k) is not None]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def write_plots(self, out_dir: str | Path) -> Path:
        """CSV curves for `dvc plots show` and a PNG of the loss curves; returns the PNG's path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, columns, rows in (("train", TRAIN_COLUMNS, self.train_rows), ("val", VAL_COLUMNS, self.val_rows)):
            with atomic_file(out_dir / f"{name}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        return self.plot_loss(out_dir / "loss.png")

    def plot_loss(self, path: Path) -> Path:
        import matplotlib  # lazily: the backend must be chosen before pyplot is imported

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if self.train_rows:
            ax.plot([r["step"] for r in self.train_rows], [r["train_loss"] for r in self.train_rows], label="train")
        if self.val_rows:
            ax.plot([r["step"] for r in self.val_rows], [r["val_loss"] for r in self.val_rows], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path


class StepProgressBar(TQDMProgressBar):
    """tqdm over optimizer steps (not micro-batches), starting at the resumed step, with loss and tokens/s."""

    def __init__(self, desc: str = "train", **kwargs) -> None:
        super().__init__(**kwargs)
        self.desc = desc

    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step
        bar.set_description(self.desc)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_exception(self, trainer, pl_module, exception) -> None:
        # a failed run (NaN loss, interrupt) closes its bars now; left open, tqdm prints them again at exit
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None:
                bar.close()


class StepLines(ProgressBar):
    """Optimizer steps as plain lines (pipelines/common/progress.py) where stderr is no terminal: a flow run's log
    gets a line per 10 %, not a bar redrawn line after line. A ProgressBar, so Lightning adds no tqdm bar."""

    def __init__(self, desc: str = "train") -> None:
        super().__init__()
        self.desc = desc
        self.enabled = True  # Lightning disables the bar on every rank but the first
        self.lines: ProgressLines | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self.enabled:
            self.lines = ProgressLines(trainer.max_steps, self.desc, "step", initial=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.lines is not None:
            self.lines.update(trainer.global_step - self.lines.n)


def step_progress(desc: str) -> ProgressBar:
    """A stage's progress: a tqdm bar over optimizer steps on a terminal, lines anywhere else."""
    return StepProgressBar(desc) if on_terminal() else StepLines(desc)
