"""train: fit the GPT from model/ on the token shards with PyTorch Lightning, resuming after any interruption.

In:  data/tokens/{train,val}.bin + meta.json     (the tokenize stage; vocab_size comes from meta.json)
     data/tokenizer/                             (copied into the model folder)
     params.yaml `model` and `train`             (pipelines/common/params.py documents every key)
Out: artifacts/model/                            Hugging Face folder (model/hf.py) + quill_run.json
                                                 (MLflow run id and tracking URI, for evaluate/register)
     checkpoints/<fingerprint>/step-XXXXXXXX.ckpt  newest train.keep_checkpoints, safetensors + JSON
                                                 (checkpoints.py), one folder per configuration
                                                 (resume.py); persist: true in dvc.yaml
     metrics/train.json                          steps, tokens_seen, train_loss, val_loss, val_bpb,
                                                 tokens_per_s, mfu, params, resumed_from_step
     plots/train/{train,val}.csv, loss.png       curves for `dvc plots show`
     an MLflow run (MLFLOW_TRACKING_URI; default sqlite:///mlflow.db, artifacts in mlartifacts/)
Run: python -m pipelines.train                   (or `dvc repro train`)

Run it again after a crash, SIGKILL or SIGTERM and it continues from the newest intact checkpoint
(same weights as an uninterrupted run, same MLflow run). A finished run re-exports without training.
Another configuration (model, tokenizer, token shards, max_steps, ...) starts fresh in its own folder;
an interrupted run of another configuration is kept and named in a log line (resume.py).
Exit codes: 0 done, 1 error (one line on stderr), 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
from mlflow.entities import Metric, Param
from pytorch_lightning.utilities.exceptions import SIGTERMException

from model import save_pretrained
from pipelines.common import tracking
from pipelines.common.atomic import write_json
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import Params, TrainParams
from pipelines.common.runner import StageError, run_stage, stage_log
from pipelines.common.tracking import RUN_FILE
from pipelines.common.training.checkpoints import SafeCheckpointIO, StepCheckpoint, latest_valid, list_checkpoints
from pipelines.common.training.log import TrainLog
from pipelines.common.training.trainer import (  # noqa: F401 - benchmarks/train.py imports the last two here
    lightning_trainer,
    precision_for,
    resolve_precision,
    uses_cuda,
)
from pipelines.train.data import DataError, TokenData, TokenDataModule
from pipelines.train.lit_gpt import LitGPT, NonFiniteLossError
from pipelines.train.log import step_progress
from pipelines.train.resume import fingerprint, incompatibilities, settle_other_runs, shard_digests

SIGTERM_EXIT = 143  # 128 + SIGTERM: the stage did not finish, so DVC must not record its outputs


class TrainError(StageError):
    """Training cannot start or continue; the message says why and what to do."""


say = stage_log("train")  # progress lines on stderr (`log` is the run's TrainLog)


class Preempted(StageError):
    """SIGTERM: a checkpoint was saved at the step boundary and the run stopped; run again to resume."""

    exit_code = SIGTERM_EXIT  # the stage did not finish, so DVC must not record its outputs


# --- the length and the Trainer -------------------------------------------------------------------


def total_steps(train: TrainParams, tokens_per_step: int) -> int:
    """max_steps, or fewer if max_tokens is reached first."""
    if train.max_tokens is None:
        return train.max_steps
    return min(train.max_steps, -(-train.max_tokens // tokens_per_step))


def build_trainer(
    t: TrainParams,
    precision: str,
    callbacks: list,
    plugins: list | None = None,
    fast_dev_run: bool = False,
    **overrides,
) -> pl.Trainer:
    """The Lightning Trainer for `t` (the stage and benchmarks/train.py build it here, the same way)."""
    return lightning_trainer(
        max_steps=t.max_steps,
        val_every=t.val_every,
        precision=precision,
        accelerator=t.accelerator,
        callbacks=callbacks,
        grad_accum=t.grad_accum,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        plugins=plugins,
        fast_dev_run=fast_dev_run,
        **overrides,
    )


# --- MLflow -------------------------------------------------------------------------------------


def start_run(client, run_id: str | None, params: Params, run_info: dict, extra: dict, layout: Layout) -> str:
    """Continue `run_id` if the store still has it, else create a run with every param that shaped it."""
    if tracking.continue_run(client, run_id):
        return run_id
    experiment_id = tracking.get_or_create_experiment(client)
    run = client.create_run(
        experiment_id,
        run_name=f"train-{params.model.preset}",
        tags={"quill.stage": "train", "mlflow.source.name": "pipelines.train"},
    )
    logged = {f"train.{k}": v for k, v in params.train.model_dump().items()}
    logged.update({f"model.{k}": v for k, v in run_info["model_config"].items()})
    logged["model.preset"] = params.model.preset
    logged.update(extra)
    logged["git_commit"] = tracking.git_commit()
    logged["tokenizer_sha256"] = run_info["tokenizer_sha256"]
    for path, digest in tracking.input_hashes(
        [layout.key(layout.tokens), layout.key(layout.tokenizer)], layout.dvc_lock, layout.root
    ).items():
        logged[f"dvc.{Path(path).name}"] = digest  # dvc.tokens, dvc.tokenizer
    items = [Param(k, str(v)) for k, v in logged.items()]
    for i in range(0, len(items), 100):  # the store takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100], synchronous=True)
    return run.info.run_id


# --- the stage ----------------------------------------------------------------------------------


def plan_run(params: Params, layout: Layout, data: TokenData):
    """The model config and what identifies this run (run_info: config, tokenizer, shards, train.*, fingerprint)."""
    if not (layout.tokenizer / "tokenizer.json").is_file():
        raise DataError(f"{layout.tokenizer / 'tokenizer.json'} not found: run dvc repro tokenize first")
    try:
        config = params.model.config(data.vocab_size)
    except ValueError as exc:
        raise TrainError(f"model: {exc}") from None
    run_info = {
        "model_config": config.to_dict(),
        "tokenizer_sha256": data.tokenizer_sha256,
        "shards": shard_digests(layout.tokens),
        "world_size": None,  # and total_steps: known once the trainer is built
        "train": params.train.model_dump(),
        "mlflow_run_id": None,
    }
    run_info["fingerprint"] = fingerprint(run_info)
    return config, run_info


def resume_step(found, run_info: dict, t: TrainParams, steps: int, run_dir: Path) -> int:
    """The step an existing checkpoint of this configuration resumes from (0 without one), after checking it
    fits; takes over its MLflow run id."""
    if found is None:
        return 0
    path, ckpt = found
    saved = ckpt.get("quill") or {}
    if not saved:
        raise TrainError(f"{path} holds no quill run info; delete {run_dir}/ to start fresh")
    finished = int(ckpt["global_step"]) >= saved.get("total_steps", steps)  # re-exported, not trained on
    problems = incompatibilities(saved, run_info, t.allow_world_size_change or finished)
    if problems:
        raise TrainError(
            f"cannot resume from {path}: {'; '.join(problems)}. Restore the old value(s), "
            f"or delete {run_dir}/ to train from scratch"
        )
    run_info["mlflow_run_id"] = saved.get("mlflow_run_id")
    say(f"resuming from {path} (step {int(ckpt['global_step'])})")
    return int(ckpt["global_step"])


def fit(
    trainer, lit: LitGPT, dm: TokenDataModule, ckpt_path, log: TrainLog, client, run_info: dict, run_dir: Path
) -> None:
    """trainer.fit, then a validation of the final weights; a NaN loss or SIGTERM ends the MLflow run and says
    what to do."""
    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
        if not log.val_rows or log.val_rows[-1]["step"] != trainer.global_step:
            trainer.validate(lit, datamodule=dm, verbose=False)  # val loss of the final weights
    except NonFiniteLossError as exc:
        _end_run(client, run_info, "FAILED")
        kept = list_checkpoints(run_dir)
        where = f"last good checkpoint kept: {kept[0][1]}" if kept else "no checkpoint was written yet"
        raise TrainError(
            f"{exc}; training stopped ({where}). Lower train.lr or raise train.warmup_steps, then run again"
        ) from None
    except SIGTERMException:
        _end_run(client, run_info, "KILLED")
        raise Preempted(
            f"SIGTERM: saved {run_dir}/ at step {trainer.global_step} and stopped; run the same command again to resume"
        ) from None


def train(
    params: Params, layout: Layout = PROJECT, *, fast_dev_run: bool = False, tracking_uri: str | None = None
) -> dict:
    """Train (or resume, or re-export a finished run) and write every output; return metrics/train.json's dict."""
    t = params.train
    data = TokenData.open(layout.tokens)
    config, run_info = plan_run(params, layout, data)
    precision = precision_for(t.precision, t.accelerator)
    run_dir = layout.checkpoints / run_info["fingerprint"]  # this configuration's checkpoints (resume.py)
    found = None if fast_dev_run else latest_valid(run_dir)
    checkpoint_io = SafeCheckpointIO({str(found[0]): found[1]} if found else None)
    step_ckpt = StepCheckpoint(run_dir, t.checkpoint_every, t.keep_checkpoints)
    trainer = build_trainer(
        t,
        precision,
        callbacks=[step_progress()] + ([] if fast_dev_run else [step_ckpt]),
        plugins=[checkpoint_io],
        fast_dev_run=fast_dev_run,
    )
    world_size = trainer.world_size
    tokens_per_step = t.batch_size * t.grad_accum * config.block_size * world_size
    steps = total_steps(t, tokens_per_step)
    if not fast_dev_run:
        trainer.fit_loop.epoch_loop.max_steps = steps  # a token budget needs the world size, known only now
    run_info.update(world_size=world_size, total_steps=steps)
    if trainer.is_global_zero and not fast_dev_run:
        for line in settle_other_runs(layout.checkpoints, run_info, run_info["fingerprint"]):
            say(line)
    resumed_from = resume_step(found, run_info, t, steps, run_dir)

    pl.seed_everything(t.seed, workers=False, verbose=False)  # the initial weights
    lit = LitGPT(config, t, steps, data.bytes_per_text_token("val"))
    client = None
    if trainer.is_global_zero and not fast_dev_run:
        client = tracking.mlflow_client(tracking_uri)
        extra = {
            "world_size": world_size,
            "precision_resolved": precision,
            "tokens_per_step": tokens_per_step,
            "total_steps": steps,
            "params": lit.model.num_params(),
            "vocab_size": data.vocab_size,
        }
        run_info["mlflow_run_id"] = start_run(client, run_info["mlflow_run_id"], params, run_info, extra, layout)
    lit.run_info = run_info
    log = TrainLog(
        tokens_per_step,
        lit.model.flops_per_token(config.block_size),
        t.log_every,
        data.bytes_per_text_token("val"),
        precision,
        client,
        run_info["mlflow_run_id"],
    )
    trainer.callbacks.insert(0, log)  # before StepCheckpoint, so a checkpoint holds the step it ends
    dm = TokenDataModule(data, config.block_size, t.batch_size, t.grad_accum, t.seed, t.val_batches)
    fit(trainer, lit, dm, str(found[0]) if found else None, log, client, run_info, run_dir)

    metrics = {
        "steps": trainer.global_step,
        "tokens_seen": log.tokens_seen,
        "train_loss": log.train_rows[-1]["train_loss"] if log.train_rows else None,
        "val_loss": log.val_rows[-1]["val_loss"] if log.val_rows else None,
        "val_bpb": log.val_rows[-1]["val_bpb"] if log.val_rows else None,
        "tokens_per_s": log.tokens_per_s,
        "mfu": log.mfu(log.tokens_per_s),
        "params": lit.model.num_params(),
        "resumed_from_step": resumed_from,
    }
    if fast_dev_run or not trainer.is_global_zero:
        return metrics
    export(lit, log, metrics, run_info, layout, client, tracking_uri)
    return metrics


def export(lit: LitGPT, log: TrainLog, metrics: dict, run_info: dict, layout: Layout, client, tracking_uri) -> None:
    """Write the model folder, metrics and plots, and attach them to the MLflow run (rank 0 only)."""
    save_pretrained(lit.model, layout.model, tokenizer_dir=layout.tokenizer)
    run_id = run_info["mlflow_run_id"]
    write_json(
        layout.model / RUN_FILE,
        {
            "mlflow_run_id": run_id,
            "mlflow_tracking_uri": tracking_uri or tracking.tracking_uri(),
            "experiment": tracking.EXPERIMENT,
            "steps": metrics["steps"],
            "tokenizer_sha256": run_info["tokenizer_sha256"],
        },
    )
    write_json(layout.train_metrics, metrics)
    png = log.write_plots(layout.train_plots)
    if client is not None:
        final = [
            Metric(f"final_{k}", float(v), 0, metrics["steps"])
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None
        ]
        client.log_batch(run_id, metrics=final, synchronous=True)
        client.log_artifact(run_id, str(png), artifact_path="plots")
        for csv_file in sorted(layout.train_plots.glob("*.csv")):
            client.log_artifact(run_id, str(csv_file), artifact_path="plots")
        client.log_artifact(run_id, str(layout.train_metrics), artifact_path="metrics")
        client.log_artifacts(run_id, str(layout.model), artifact_path="model")
        _end_run(client, run_info, "FINISHED")


def _end_run(client, run_info: dict, status: str) -> None:
    if client is not None and run_info.get("mlflow_run_id"):
        client.set_terminated(run_info["mlflow_run_id"], status=status)


def summarize(params: Params, layout: Layout) -> str:
    """Train (or resume); the line printed on success."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no GPU/TPU banner lines
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13, harmless
    metrics = train(params, layout)
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.train [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("train", summarize, argv)
