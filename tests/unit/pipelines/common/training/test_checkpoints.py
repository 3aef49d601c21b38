"""pipelines/common/training/checkpoints.py: safetensors checkpoints, torn ones skipped; StepCheckpoint's saves at
validation steps and on SIGTERM, on a tiny regression trained by the stages' Lightning machinery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset

from pipelines.common.training import checkpoints as ckpt
from pipelines.common.training.lit import LitCausalLM, Optimization
from pipelines.common.training.log import TrainLog
from pipelines.common.training.trainer import lightning_trainer


def test_checkpoint_round_trip_keeps_types_and_shared_tensors(tmp_path):
    w = torch.randn(4, 3)
    obj = {
        "state_dict": {"a": w, "b": w, "bf16": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}],
            }
        ],
        "loops": {"x": {"n": 3, "flag": True, "none": None, "nan": float("nan")}},
        "rng": np.arange(5, dtype=np.uint32),
        "empty": torch.empty(0),
    }
    path = tmp_path / "step-00000001.ckpt"
    ckpt.save(obj, path)
    back = ckpt.load(path)
    assert torch.equal(back["state_dict"]["a"], w) and back["state_dict"]["a"] is back["state_dict"]["b"]
    assert back["state_dict"]["bf16"].dtype == torch.bfloat16
    state = back["optimizer_states"][0]
    assert list(state["state"]) == [0] and torch.equal(state["state"][0]["step"], torch.tensor(3.0))
    assert state["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["loops"]["x"]["n"] == 3 and back["loops"]["x"]["flag"] is True and back["loops"]["x"]["none"] is None
    assert math.isnan(back["loops"]["x"]["nan"])
    assert np.array_equal(back["rng"], np.arange(5)) and back["empty"].numel() == 0
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError, match="cannot store object"):
        ckpt.save({"bad": object()}, tmp_path / "x.ckpt")


def test_torn_or_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path):
    for step in (4, 8, 12):
        ckpt.save({"global_step": step, "w": torch.full((1000,), float(step))}, ckpt.checkpoint_path(tmp_path, step))
    newest, middle = ckpt.checkpoint_path(tmp_path, 12), ckpt.checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    data = bytearray(middle.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data
    middle.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint") as record:
        path, content = ckpt.latest_valid(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 4) and content["global_step"] == 4
    assert len(record) == 2 and "CRC" in str(record[1].message)
    (tmp_path / "step-00000016.ckpt").write_bytes(b"garbage")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [16, 12, 8, 4]
    (tmp_path / ".step-00000020.ckpt.abc.tmp").write_bytes(b"half")
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000012.ckpt", "step-00000016.ckpt"]


# --- StepCheckpoint in a real fit: 6 steps of 2 micro-batches, validation (3 batches) and a checkpoint every 2 steps


class Regression(LitCausalLM):
    def batch_loss(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y)


class Batches(IterableDataset):
    """Endless micro-batches from micro-batch `start` on, each a function of its index (as the stages' data)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
            yield x, x.sum(-1, keepdim=True)
            k += 1


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Batches(self.trainer.global_step * 2), batch_size=None)

    def val_dataloader(self):
        return DataLoader([next(iter(Batches(1000 + i))) for i in range(3)], batch_size=None)


class Sigterm(pl.Callback):
    """SIGTERM as Lightning's handler records it, after micro-batch `at`."""

    def __init__(self, at: int | None):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            trainer._signal_connector.received_sigterm = True


class ValBatches(pl.Callback):
    def __init__(self):
        self.seen = 0

    def on_validation_batch_end(self, *args):
        self.seen += 1


def fit(directory, resume=None, sigterm_at: int | None = None) -> tuple[TrainLog, ValBatches]:
    torch.manual_seed(0)
    lit = Regression(nn.Linear(4, 1), Optimization(lr=0.05, min_lr=0.005, warmup_steps=1, weight_decay=0.0), 6)
    log, val_batches = TrainLog(8, 1.0, 1, None, "32-true"), ValBatches()
    trainer = lightning_trainer(
        max_steps=6,
        val_every=2,
        precision="32-true",
        accelerator="cpu",
        grad_accum=2,
        # the stages' order: the log first, so a checkpoint holds what it logged at its step
        callbacks=[log, val_batches, Sigterm(sigterm_at), ckpt.StepCheckpoint(directory, every=2, keep=10)],
        plugins=[ckpt.SafeCheckpointIO()],
        enable_progress_bar=False,
    )
    trainer.fit(lit, datamodule=Data(), ckpt_path=resume)
    return log, val_batches


def val_steps(path) -> list[int]:
    [log_state] = [v for k, v in ckpt.load(path)["callbacks"].items() if k.startswith("TrainLog")]
    return [row["step"] for row in log_state["val_rows"]]


def test_a_checkpoint_at_a_validation_step_holds_that_validation_and_a_run_resumed_there_keeps_it(tmp_path):
    log, _ = fit(tmp_path / "a")
    assert [r["step"] for r in log.val_rows] == [2, 4, 6]
    assert val_steps(ckpt.checkpoint_path(tmp_path / "a", 4)) == [2, 4]  # saved after step 4's validation
    # resumed at step 4 (Lightning does not validate step 4 again): the curve is the uninterrupted run's
    resumed, _ = fit(tmp_path / "a", resume=ckpt.checkpoint_path(tmp_path / "a", 4))
    untimed = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log.train_rows]
    assert resumed.val_rows == log.val_rows
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in resumed.train_rows] == untimed


def test_sigterm_before_a_validation_step_validates_it_whole_then_saves_and_stops(tmp_path):
    with pytest.raises(SIGTERMException):
        fit(tmp_path, sigterm_at=6)  # mid step 4 (micro-batches 6 and 7): the step ends, validates, saves, stops
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 2]
    assert val_steps(ckpt.checkpoint_path(tmp_path, 4)) == [2, 4]
    log, val_batches = fit(tmp_path, resume=ckpt.checkpoint_path(tmp_path, 4))
    assert [r["step"] for r in log.val_rows] == [2, 4, 6] and val_batches.seen == 3  # step 6's, not step 4's again
