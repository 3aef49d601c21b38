"""chat_register: register the evaluated chat model as its own MLflow model, decide its champion.

In:  artifacts/chat_model/              the finetune stage's Hugging Face folder (+ quill_run.json: its run)
     metrics/chat_eval.json             the chat_eval stage's numbers (response_bpb, eot_rate, the base's, tasks)
     reports/chat_eval/evaluated.json   ... and what they are of (must be this very model)
     reports/chat_eval/samples.json     both models' replies for the model card
     params.yaml `registry`             chat_model_name, min_improvement, force_promote, promotion, lock_timeout_s
Out: artifacts/chat_registered.json     {model_name, version, model_uri, aliases, run_id, promoted, why, forced,
                                         response_bpb, champion_version, champion_response_bpb, tracking_uri}
     MLflow: a pyfunc model logged to the finetune run, a new version of registry.chat_model_name with tags
     (lineage: the base model's registry version and run, the chat data's hash, the fine-tuning run and method;
     response_bpb, eot_rate, the base's; the decision), the model card as its description; aliases as register's.
Run: python -m pipelines.chat_register     (or `dvc repro chat_register`)

The gate is response_bpb (lower is better) by registry.min_improvement. A champion scored on other held-out
conversations or by another scorer is scored again on the current ones first. Registering once, the lock, the
rule and finishing after a crash: pipelines/common/registration/versions.py, shared with register.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from model import Engine, load_pretrained
from model.chat import literal
from pipelines.common import tracking
from pipelines.common.chat_test import RESPONSE_SCORER, held_out_conversations, response_score
from pipelines.common.contracts import HF_MODEL_PATH, Tag
from pipelines.common.hashing import content_hash
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.model_folder import check_model_dir
from pipelines.common.params import Params
from pipelines.common.registration.model_card import render_chat_card
from pipelines.common.registration.versions import Subject, register_subject, registered_run
from pipelines.common.runner import StageError, run_stage, stage_log
from pipelines.common.tracking import check_tracking, flat_metrics, git_commit, input_hashes, training_run_id

GATE = "response_bpb"
HEADLINE = ("response_bpb", "eot_rate", "base_response_bpb", "base_eot_rate", "response_bpb_gain")
CONVERSATIONS = "chat_eval_conversations"  # tag: how many held-out conversations the gate scored


class ChatRegisterError(StageError):
    """The chat model cannot be registered; the message says why and what to do."""


log = stage_log("chat_register")


def read_evaluation(layout: Layout) -> dict:
    """metrics/chat_eval.json + evaluated.json, after checking they are complete and describe artifacts/chat_model."""
    check_model_dir(layout.chat_model)
    rerun = "rerun the chat_eval stage (dvc repro chat_eval)"
    for path in (layout.chat_eval_metrics, layout.chat_evaluated):
        if not path.is_file():
            raise ChatRegisterError(f"{path} missing: {rerun}")
    metrics = {**json.loads(layout.chat_eval_metrics.read_text()), **json.loads(layout.chat_evaluated.read_text())}
    missing = [k for k in (GATE, "model_sha256", "test_data_sha256", "mlflow_run_id") if k not in metrics]
    if missing:
        raise ChatRegisterError(f"{layout.chat_eval_metrics} lacks {missing}: {rerun}")
    if metrics["model_sha256"] != content_hash(layout.chat_model / "model.safetensors"):
        raise ChatRegisterError(f"{layout.chat_eval_metrics} describes another model than {layout.chat_model}: {rerun}")
    return metrics


# --- the champion gate: response_bpb on the same conversations, scored the same way --------------------


def scored_differently(champion_tags: dict, metrics: dict) -> str:
    """Why the champion's recorded response_bpb does not compare with this evaluation ("" when it does)."""
    reasons = []
    if champion_tags.get(Tag.TEST_DATA) != metrics["test_data_sha256"]:
        reasons.append("the held-out conversations changed")
    if champion_tags.get(CONVERSATIONS) != str(metrics.get("conversations")):
        reasons.append(
            f"{champion_tags.get(CONVERSATIONS, 'unrecorded')} conversations, now {metrics.get('conversations')}"
        )
    if champion_tags.get(Tag.SCORER) != RESPONSE_SCORER:
        reasons.append(f"scorer {champion_tags.get(Tag.SCORER, 'unrecorded')}, now {RESPONSE_SCORER}")
    if GATE not in champion_tags:
        reasons.append(f"it has no {GATE}")
    return "; ".join(reasons)


def rescorer(metrics: dict, params: Params, layout: Layout):
    """The champion's response_bpb on the current held-out conversations when it was scored differently."""

    def rescore(champion_uri: str, champion_tags: dict) -> tuple[float, str] | None:
        why = scored_differently(champion_tags, metrics)
        if not why:
            return None
        log(f"champion {champion_uri} was scored differently ({why}): scoring it as this model was")
        engine = Engine.from_pretrained(Path(mlflow.artifacts.download_artifacts(champion_uri)) / HF_MODEL_PATH)
        conversations = held_out_conversations(layout.chat / "test.jsonl", params.finetune.eval.max_conversations)
        return response_score(engine.model, literal(engine.tokenizer), conversations, params.eval.batch_size).bpb, why

    return rescore


# --- the version's tags and card -------------------------------------------------------------------


def finetune_run(client, run_id: str | None) -> tuple[dict[str, str], dict]:
    """The fine-tuning run's tags (the base's lineage) and final metrics; empty when the store lacks the run."""
    if not run_id:
        return {}, {}
    try:
        run = client.get_run(run_id)
    except MlflowException:
        log(f"warning: fine-tuning run {run_id} is not in {client.tracking_uri}; the card leaves out its lineage")
        return {}, {}
    final = {k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_")}
    params = {k: run.data.params[k] for k in ("finetune.method", "finetune.max_steps") if k in run.data.params}
    return run.data.tags, {**params, **final}


def version_tags(metrics: dict, run_id: str, finetune_tags: dict, n_params: int, layout: Layout) -> dict[str, str]:
    """Lineage (base version and run, chat data hash, fine-tuning run), how the gate was scored, headline metrics."""
    tags = {
        "git_commit": git_commit() or "unknown",
        "run_id": run_id,
        Tag.TRAINING_RUN: training_run_id(layout.chat_model) or "unknown",  # the fine-tuning run
        "parameters": str(n_params),
        Tag.TOKENIZER: str(metrics.get("tokenizer_sha256")),
        Tag.TEST_DATA: metrics["test_data_sha256"],
        Tag.SCORER: RESPONSE_SCORER,
        CONVERSATIONS: str(metrics.get("conversations")),
        "model_sha256": metrics["model_sha256"],
        "base": str(metrics.get("base")),
        "base_model_sha256": str(metrics.get("base_model_sha256")),
        "eot_temperature": str(metrics.get("temperature")),
    }
    for key in ("base_model_name", "base_model_version", "base_run_id"):
        if f"quill.{key}" in finetune_tags:
            tags[key] = finetune_tags[f"quill.{key}"]
    for path, digest in input_hashes([layout.key(layout.chat)], layout.dvc_lock, layout.root).items():
        tags[f"{Tag.DVC_HASH}{path}"] = digest  # the chat data (all three splits)
    tags.update({k: f"{metrics[k]:.6g}" for k in HEADLINE if isinstance(metrics.get(k), int | float)})
    blob = json.dumps({"finetune_run": tags[Tag.TRAINING_RUN], "evaluation": metrics}, sort_keys=True, default=str)
    tags[Tag.REGISTRATION_KEY] = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
    return tags


def card_writer(name: str, tags: dict[str, str], metrics: dict, finetune: dict, layout: Layout):
    config = json.loads((layout.chat_model / "config.json").read_text()).get("quill_config", {})
    samples = json.loads(layout.chat_samples.read_text()) if layout.chat_samples.is_file() else []
    tasks = {side: flat_metrics(v) for side, v in metrics.get("tasks", {}).items()}
    lineage = {
        k: v for k, v in tags.items() if k not in HEADLINE and k not in ("run_id", "parameters", "registration_key")
    }

    def card(version: str, decision: dict) -> str:
        shown = {**metrics, "tasks": tasks}
        return render_chat_card(
            name, version, config, int(tags["parameters"]), shown, finetune, lineage, samples, decision
        )

    return card


# --- the stage ------------------------------------------------------------------------------------


def chat_register(params: Params, layout: Layout = PROJECT) -> dict:
    """Register artifacts/chat_model as a version of registry.chat_model_name, decide its champion, write
    artifacts/chat_registered.json; return its content. A rerun after a crash finishes the same registration."""
    metrics = read_evaluation(layout)
    uri = check_tracking()
    mlflow.set_tracking_uri(uri)
    client = tracking.mlflow_client(uri)
    run_id = registered_run(
        client, metrics["mlflow_run_id"], "the chat evaluation", "rerun it against this store (dvc repro chat_eval -f)"
    )
    finetune_tags, finetune = finetune_run(client, training_run_id(layout.chat_model))
    n_params = load_pretrained(layout.chat_model).num_params()
    tags = version_tags(metrics, run_id, finetune_tags, n_params, layout)
    name = params.registry.chat_model_name
    subject = Subject(
        name=name,
        model=layout.chat_model,
        registered=layout.chat_registered,
        metric=GATE,
        value=metrics[GATE],
        run_id=run_id,
        tags=tags,
        rescore=rescorer(metrics, params, layout),
        card=card_writer(name, tags, metrics, finetune, layout),
        examples=["<|im_start|>user\nGood morrow!<|im_end|>\n<|im_start|>assistant\n"],
        log=log,
    )
    return register_subject(subject, params.registry, uri)


def summarize(params: Params, layout: Layout) -> str:
    result = chat_register(params, layout)
    return (
        f"{result['model_name']} v{result['version']} {result['aliases']}: "
        f"{'promoted' if result['promoted'] else 'not promoted'} ({result['why']})"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.chat_register [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("chat_register", summarize, argv)
