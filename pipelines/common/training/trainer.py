"""The hardware knobs resolved and the Lightning Trainer built: the same way for every training stage.

>>> resolve_precision("auto", cuda=False, bf16_supported=False)
'32-true'
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy

from model.transformer import Block


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, cuda: bool, bf16_supported: bool) -> str:
    """Lightning's precision string: auto is bf16-mixed on a GPU that has bf16, else 32-bit."""
    if precision == "auto":
        return "bf16-mixed" if cuda and bf16_supported else "32-true"
    return "32-true" if precision == "32" else precision


def precision_for(precision: str, accelerator: str) -> str:
    """`resolve_precision` on this machine (and TF32 matmuls switched on where CUDA runs)."""
    cuda = uses_cuda(accelerator)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
    return resolve_precision(precision, cuda, cuda and torch.cuda.is_bf16_supported())


def resolve_strategy(strategy: str):
    """auto lets Lightning choose (one device: none; several: DDP); fsdp shards whole transformer blocks."""
    if strategy != "fsdp":
        return strategy
    # "full" state dicts: the checkpoint is one file, loadable on any world size
    return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD")


def lightning_trainer(
    *,
    max_steps: int,
    val_every: int,
    precision: str,
    accelerator: str,
    callbacks: list,
    grad_accum: int = 1,
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    plugins: list | None = None,
    fast_dev_run: bool = False,
    **overrides,
) -> pl.Trainer:
    """A Trainer that counts optimizer steps, validates every `val_every` of them, and leaves logging and
    checkpointing to the stage's own callbacks (overrides: any other Trainer argument)."""
    kwargs = dict(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=resolve_strategy(strategy),
        precision=precision,
        max_steps=max_steps,
        accumulate_grad_batches=grad_accum,
        val_check_interval=val_every * grad_accum,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        fast_dev_run=fast_dev_run,
        plugins=plugins,
        callbacks=callbacks,
    )
    return pl.Trainer(**{**kwargs, **overrides})
