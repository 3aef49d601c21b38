"""finetune: fine-tune a base model for chat on the chat_data stage's conversations, resuming after any interruption.

In:  finetune.base                           artifacts/model (default), models:/<name>@<alias> or a local Llama-layout
                                             Hugging Face folder (base.py); its own tokenizer encodes the chat data
     data/chat/{train,val}.jsonl             the chat_data stage's conversations
     params.yaml `finetune`                  method (full | lora), lora.*, steps, batch, schedule, cadence
Out: artifacts/chat_model/                   plain Hugging Face folder (LoRA merged in), base's tokenizer with the
                                             ChatML chat_template, quill_run.json (MLflow run, base model)
     artifacts/chat_adapter/                 lora: peft's adapter files; full: a README saying there is none
     checkpoints_finetune/<fingerprint>/     resumable checkpoints, newest finetune.keep_checkpoints (persist: true)
     metrics/finetune.json                   steps, train_loss, val_loss, tokens_per_s, params, trainable_params,
                                             resumed_from_step, max_length, per-split windows and drops by reason
     plots/finetune/{train,val}.csv, loss.png
     an MLflow run of its own, tagged with the base's training run and registry version
Run: python -m pipelines.finetune [--root DIR]   (or `dvc repro finetune`)

The loss covers the assistant's tokens only, <|im_end|> included (data.py). Training is the train stage's
machinery (pipelines/common/training/): Lightning, safetensors checkpoints, the same schedule and NaN stop. Run it
again after a crash, SIGKILL or SIGTERM and it continues from the newest intact checkpoint of this configuration
(the base's weights and tokenizer, the chat data, every finetune.* key but hardware and cadence) to the same final
weights; a finished run re-exports without training.
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

from model.chat import chat_markers, literal
from pipelines.common import tracking
from pipelines.common.atomic import scratch_dir, write_json
from pipelines.common.base_model import Base, resolve_base
from pipelines.common.errors import StageError
from pipelines.common.hashing import sha256_file
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.params import FinetuneParams, Params
from pipelines.common.runner import run_stage, stage_log
from pipelines.common.tracking import RUN_FILE
from pipelines.common.training.checkpoints import SafeCheckpointIO, StepCheckpoint, latest_valid, list_checkpoints
from pipelines.common.training.lit import NonFiniteLossError, Optimization
from pipelines.common.training.log import TrainLog, step_progress
from pipelines.common.training.resume import differences, digest, settle_other_runs
from pipelines.common.training.trainer import lightning_trainer, precision_for
from pipelines.finetune import lora
from pipelines.finetune.data import ChatDataError, ChatDataModule, Encoded, encode_split, pad_id, read_split
from pipelines.finetune.export import save_chat_model
from pipelines.finetune.lit_chat import LitChat

SIGTERM_EXIT = 143  # 128 + SIGTERM: the stage did not finish, so DVC must not record its outputs
SCRATCH = ".finetune-scratch-"  # a downloaded registry base and the chat tokenizer, beside artifacts/chat_model
# finetune.* keys that may change between an interrupted run and its resumption without changing its weights;
# sources and split shape the data, which the fingerprint covers by the files' hashes
RESUMABLE_CHANGES = {
    *("sources", "split"),
    "eval",  # the chat_eval stage's settings
    *("precision", "accelerator"),
    *("val_every", "val_batches", "log_every", "checkpoint_every", "keep_checkpoints"),
}

say = stage_log("finetune")


class FinetuneError(StageError):
    """Fine-tuning cannot start or continue; the message says why and what to do."""


class Preempted(StageError):
    """SIGTERM: a checkpoint was saved at the step boundary and the run stopped; run again to resume."""

    exit_code = SIGTERM_EXIT


# --- data and identity ---------------------------------------------------------------------------


def encode_data(base: Base, layout: Layout, max_length: int) -> dict[str, Encoded]:
    """The train and val windows, encoded with the base's tokenizer (content encoded literally)."""
    tokenizer = literal(base.tokenizer())
    encoded = {
        split: encode_split(tokenizer, read_split(layout.chat / f"{split}.jsonl"), max_length)
        for split in ("train", "val")
    }
    for split, e in encoded.items():
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(e.dropped.items()) if n)
        say(
            f"{split}: {e.conversations} conversations -> {len(e.windows)} windows of <= {max_length} tokens"
            + (f" (left out: {dropped})" if dropped else "")
        )
        if not e.windows:
            raise ChatDataError(
                f"no {split} conversation fits finetune.max_length={max_length} with an assistant turn "
                f"({dict(e.dropped)}); raise finetune.max_length or check data/chat/{split}.jsonl"
            )
    return encoded


def plan_run(f: FinetuneParams, base: Base, layout: Layout, max_length: int) -> dict:
    """What identifies this run (saved in every checkpoint) and its fingerprint: the base's weights, config and
    tokenizer, the chat data, and every finetune.* key that shapes the weights."""
    identity = {
        "base": {
            "config": base.config.to_dict(),
            "weights_sha256": base.weights_sha256,
            "tokenizer_sha256": base.tokenizer_sha256,
        },
        "data": {split: sha256_file(layout.chat / f"{split}.jsonl") for split in ("train", "val")},
        "finetune": {k: v for k, v in f.model_dump().items() if k not in RESUMABLE_CHANGES},
        "max_length": max_length,
    }
    return {**identity, "fingerprint": digest(identity), "total_steps": f.max_steps, "mlflow_run_id": None}


def resume_step(found, run_info: dict, run_dir: Path) -> int:
    """The step a checkpoint of this configuration resumes from (0 without one); takes over its MLflow run id."""
    if found is None:
        return 0
    path, ckpt = found
    saved = ckpt.get("quill") or {}
    if saved.get("fingerprint") != run_info["fingerprint"]:
        problems = "; ".join(differences({k: saved.get(k) for k in ("base", "data", "finetune")}, run_info)[:4])
        raise FinetuneError(
            f"cannot resume from {path} ({problems or 'no run info'}); delete {run_dir}/ to start fresh"
        )
    run_info["mlflow_run_id"] = saved.get("mlflow_run_id")
    say(f"resuming from {path} (step {int(ckpt['global_step'])})")
    return int(ckpt["global_step"])


# --- MLflow ----------------------------------------------------------------------------------------


def base_tags(base: Base) -> dict[str, str]:
    """How the run links to its base model: the base as given, its training run and registry version."""
    tags = {"quill.base": base.spec, "quill.base_run_id": base.run_id, "quill.base_model_name": base.model_name}
    tags["quill.base_model_version"] = base.version
    return {k: str(v) for k, v in tags.items() if v is not None}


def start_run(client, run_info: dict, f: FinetuneParams, base: Base, extra: dict, layout: Layout) -> str:
    """Continue the checkpoint's MLflow run if the store still has it, else create one linked to the base."""
    if run_id := tracking.continue_run(client, run_info["mlflow_run_id"]):
        return run_id
    run = client.create_run(
        tracking.get_or_create_experiment(client),
        run_name=f"finetune-{f.method}",
        tags={"quill.stage": "finetune", "mlflow.source.name": "pipelines.finetune", **base_tags(base)},
    )
    logged = {f"finetune.{k}": v for k, v in f.model_dump(exclude={"sources", "split"}).items()}
    logged.update({f"model.{k}": v for k, v in base.config.to_dict().items()})
    logged.update(extra)
    logged.update(
        git_commit=tracking.git_commit(), tokenizer_sha256=base.tokenizer_sha256, fingerprint=run_info["fingerprint"]
    )
    for path, h in tracking.input_hashes([layout.key(layout.chat)], layout.dvc_lock, layout.root).items():
        logged[f"dvc.{Path(path).name}"] = h
    items = [Param(k, str(v)) for k, v in logged.items()]
    for i in range(0, len(items), 100):  # the store takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100], synchronous=True)
    return run.info.run_id


def _end_run(client, run_info: dict, status: str) -> None:
    if client is not None and run_info.get("mlflow_run_id"):
        client.set_terminated(run_info["mlflow_run_id"], status=status)


# --- the stage ---------------------------------------------------------------------------------------


def finetune(params: Params, layout: Layout = PROJECT, *, tracking_uri: str | None = None) -> dict:
    """Fine-tune (or resume, or re-export a finished run) and write every output; return metrics/finetune.json."""
    f = params.finetune
    if f is None:
        raise FinetuneError("params.yaml has no finetune section (finetune.sources, finetune.base, ...)")
    uri = tracking_uri or tracking.tracking_uri()
    with scratch_dir(layout.chat_model.parent, SCRATCH) as scratch:
        base = resolve_base(f.base, layout, scratch, uri)
        max_length = f.max_length or base.config.block_size
        if max_length > base.config.block_size:
            raise FinetuneError(
                f"finetune.max_length={max_length} exceeds the base's context ({base.config.block_size} tokens)"
            )
        data = encode_data(base, layout, max_length)
        run_info = plan_run(f, base, layout, max_length)
        return train_and_export(f, base, data, run_info, layout, uri, scratch)


def train_and_export(
    f, base: Base, data: dict[str, Encoded], run_info: dict, layout: Layout, uri: str, scratch
) -> dict:
    run_dir = layout.finetune_checkpoints / run_info["fingerprint"]
    found = latest_valid(run_dir)
    for line in settle_other_runs(
        layout.finetune_checkpoints,
        run_info["fingerprint"],
        lambda info: differences({k: info.get(k) for k in ("base", "data", "finetune")}, run_info),
    ):
        say(line)
    resumed_from = resume_step(found, run_info, run_dir)

    precision = precision_for(f.precision, f.accelerator)
    trainer = lightning_trainer(
        max_steps=f.max_steps,
        val_every=f.val_every,
        precision=precision,
        accelerator=f.accelerator,
        grad_accum=f.grad_accum,
        callbacks=[step_progress("finetune"), StepCheckpoint(run_dir, f.checkpoint_every, f.keep_checkpoints)],
        plugins=[SafeCheckpointIO({str(found[0]): found[1]} if found else None)],
        inference_mode=False,  # a LoRA model validates with grad mode on (lit_chat.py)
    )
    pl.seed_everything(f.seed, workers=False, verbose=False)  # LoRA's initial A matrices
    gpt = base.load()
    base_params = gpt.num_params()  # before LoRA adds its adapters to `gpt` in place; the export merges them away
    model = lora.wrap(gpt, f.lora, chat_markers(base.tokenizer())) if f.method == "lora" else gpt
    lit = LitChat(model, Optimization.of(f), f.max_steps, wrapped=f.method == "lora")
    train_windows = data["train"].windows
    mean_window = sum(len(w.inputs) for w in train_windows) / len(train_windows)
    tokens_per_step = round(f.batch_size * f.grad_accum * mean_window)  # conversation tokens, padding left out

    client = tracking.mlflow_client(uri)
    extra = {
        "base_params": base_params,
        "trainable_params": lit.trainable_params(),
        "max_length": run_info["max_length"],
        "precision_resolved": precision,
        "train_windows": len(train_windows),
    }
    run_info["mlflow_run_id"] = start_run(client, run_info, f, base, extra, layout)
    lit.run_info = run_info
    log = TrainLog(
        tokens_per_step,
        gpt.flops_per_token(run_info["max_length"]),
        f.log_every,
        None,
        precision,
        client,
        run_info["mlflow_run_id"],
    )
    trainer.callbacks.insert(0, log)  # before StepCheckpoint, so a checkpoint holds the step it ends
    pad = pad_id(base.tokenizer())
    dm = ChatDataModule(train_windows, data["val"].windows, f.batch_size, f.grad_accum, f.seed, pad, f.val_batches)
    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=str(found[0]) if found else None)
        if not log.val_rows or log.val_rows[-1]["step"] != trainer.global_step:
            trainer.validate(lit, datamodule=dm, verbose=False)  # val loss of the final weights
    except NonFiniteLossError as exc:
        _end_run(client, run_info, "FAILED")
        kept = list_checkpoints(run_dir)
        where = f"last good checkpoint kept: {kept[0][1]}" if kept else "no checkpoint was written yet"
        raise FinetuneError(f"{exc}; fine-tuning stopped ({where}). Lower finetune.lr, then run again") from None
    except SIGTERMException:
        _end_run(client, run_info, "KILLED")
        raise Preempted(
            f"SIGTERM: saved {run_dir}/ at step {trainer.global_step}; run the same command again to resume"
        ) from None

    metrics = {
        "steps": trainer.global_step,
        "train_loss": log.train_rows[-1]["train_loss"] if log.train_rows else None,
        "val_loss": log.val_rows[-1]["val_loss"] if log.val_rows else None,
        "tokens_per_s": log.tokens_per_s,
        "params": base_params,
        "trainable_params": extra["trainable_params"],
        "resumed_from_step": resumed_from,
        "max_length": run_info["max_length"],
        "data": {split: e.summary() for split, e in data.items()},
    }
    export(lit, f, base, metrics, run_info, layout, client, uri, log, scratch)
    return metrics


def export(
    lit: LitChat, f, base: Base, metrics: dict, run_info: dict, layout: Layout, client, uri, log, scratch
) -> None:
    """The adapter (before merging), the merged chat model, metrics and plots; all attached to the MLflow run."""
    if f.method == "lora":
        lora.save_adapter(lit.model, layout.chat_adapter, base.spec)
        merged = lora.merge(lit.model)
    else:
        lora.note_no_adapter(layout.chat_adapter, layout.key(layout.chat_model))
        merged = lit.model
    save_chat_model(merged.eval(), layout.chat_model, base.tokenizer_files, scratch)
    run_id = run_info["mlflow_run_id"]
    write_json(
        layout.chat_model / RUN_FILE,
        {
            "mlflow_run_id": run_id,
            "mlflow_tracking_uri": uri,
            "experiment": tracking.EXPERIMENT,
            "steps": metrics["steps"],
            "tokenizer_sha256": base.tokenizer_sha256,
            "method": f.method,
            "base": {"spec": base.spec, "run_id": base.run_id, "model_name": base.model_name, "version": base.version},
        },
    )
    write_json(layout.finetune_metrics, metrics)
    png = log.write_plots(layout.finetune_plots)
    final = [Metric(f"final_{k}", float(v), 0, metrics["steps"]) for k, v in tracking.flat_metrics(metrics).items()]
    client.log_batch(run_id, metrics=final, synchronous=True)
    client.log_artifact(run_id, str(png), artifact_path="plots")
    for csv_file in sorted(layout.finetune_plots.glob("*.csv")):
        client.log_artifact(run_id, str(csv_file), artifact_path="plots")
    client.log_artifact(run_id, str(layout.finetune_metrics), artifact_path="metrics")
    client.log_artifacts(run_id, str(layout.chat_model), artifact_path="chat_model")
    if f.method == "lora":
        client.log_artifacts(run_id, str(layout.chat_adapter), artifact_path="chat_adapter")
    _end_run(client, run_info, "FINISHED")


def summarize(params: Params, layout: Layout) -> str:
    """Fine-tune (or resume); the line printed on success."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no GPU/TPU banner lines
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13, harmless
    metrics = finetune(params, layout)
    headline = {k: v for k, v in metrics.items() if k != "data"}
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()})


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.finetune [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("finetune", summarize, argv)
