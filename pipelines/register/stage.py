"""register: log the evaluated model to MLflow as a pyfunc model, register a version, decide the champion.

In:  artifacts/model/                 the Hugging Face folder (+ quill_run.json from train)
     metrics/eval.json                the evaluate stage's numbers
     reports/eval/evaluated.json      ... and what they are of (must be this very model)
     reports/eval/samples.json        generation samples for the model card
     params.yaml `registry`           model_name, min_improvement, force_promote, promotion, lock_timeout_s
Out: artifacts/registered.json        {model_name, version, model_uri, aliases, run_id, promoted, why, forced,
                                       test_bpb, champion_version, champion_test_bpb, tracking_uri}
     MLflow: a pyfunc model logged to the evaluation's run (the HF folder under artifacts/hf_model, see
     pipelines/common/registration/pyfunc_model.py), a new version of registry.model_name with tags (git commit,
     DVC hashes of data and tokenizer, training run id, model_sha256, registration_key, parameter count, headline
     metrics, the decision) and the model card as its description; aliases `challenger` / `champion`.
Run: python -m pipelines.register     (or `dvc repro register`)

The gate is test_bpb. A champion scored differently (another test split, another eval.stride, another version of
the scorer: its version tags record all three) is re-evaluated on the current split as the new model was first.
Registering once, the lock, the rule and finishing after a crash: pipelines/common/registration/versions.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from model import Engine, load_pretrained
from pipelines.common import tracking
from pipelines.common.clean_split import read_texts
from pipelines.common.contracts import HEADLINE_METRICS, HF_MODEL_PATH, Tag
from pipelines.common.hashing import content_hash
from pipelines.common.heldout import SCORER, held_out
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.model_folder import check_model_dir
from pipelines.common.params import Params, RegistryParams
from pipelines.common.registration.model_card import render_card
from pipelines.common.registration.versions import Subject, register_subject, registered_run
from pipelines.common.runner import StageError, run_stage, stage_log
from pipelines.common.tracking import check_tracking, flat_metrics, git_commit, input_hashes, training_run_id


class RegisterError(StageError):
    """Registration cannot proceed; the message says why and what to do."""


log = stage_log("register")


# --- checks ----------------------------------------------------------------------------------------


def read_evaluation(layout: Layout) -> dict:
    """metrics/eval.json, after checking it is complete and describes the model in artifacts/model."""
    check_model_dir(layout.model)
    if not layout.eval_metrics.is_file():
        raise RegisterError(f"{layout.eval_metrics} missing: run the evaluate stage first (dvc repro evaluate)")
    if not layout.evaluated.is_file():
        raise RegisterError(f"{layout.evaluated} missing: rerun the evaluate stage (dvc repro evaluate)")
    metrics = {**json.loads(layout.eval_metrics.read_text()), **json.loads(layout.evaluated.read_text())}
    missing = [k for k in ("test_bpb", "model_sha256", "test_data_sha256") if k not in metrics]
    if missing:
        raise RegisterError(f"{layout.eval_metrics} lacks {missing}: rerun the evaluate stage (dvc repro evaluate)")
    if metrics["model_sha256"] != content_hash(layout.model / "model.safetensors"):
        raise RegisterError(
            f"{layout.eval_metrics} describes another model than {layout.model}: rerun the evaluate stage (dvc repro evaluate)"
        )
    return metrics


# --- the champion gate: test_bpb, scored the same way ----------------------------------------------


def reevaluate_bpb(model_uri: str, test_file: Path, stride: int | None) -> float:
    """The champion's bits per byte on the current test split (its own tokenizer), same windows as evaluate."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    engine = Engine.from_pretrained(local / HF_MODEL_PATH)
    texts = read_texts(test_file)
    docs = [engine.encode(t) for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return held_out(engine.model, docs, engine.eos_token_id, n_bytes, stride, 16, desc="champion on new split")[
        "test_bpb"
    ]


def scored_differently(champion_tags: dict, metrics: dict) -> str:
    """What makes the champion's recorded test_bpb incomparable with this evaluation ("" when nothing does): another
    test split, another window stride (a smaller one gives every token more context: a lower bits per byte for the
    same model), or another version of the scorer."""
    reasons = []
    if champion_tags.get(Tag.TEST_DATA) != metrics["test_data_sha256"]:
        reasons.append("the test split changed")
    stride = str(metrics.get("test_window_stride"))
    if champion_tags.get(Tag.STRIDE) != stride:
        reasons.append(f"window stride {champion_tags.get(Tag.STRIDE, 'unrecorded')}, now {stride}")
    if champion_tags.get(Tag.SCORER) != SCORER:
        reasons.append(f"scorer {champion_tags.get(Tag.SCORER, 'unrecorded')}, now {SCORER}")
    return "; ".join(reasons)


def rescorer(metrics: dict, layout: Layout):
    """The subject's rescore: the champion's test_bpb on the current split when it was scored differently."""

    def rescore(champion_uri: str, champion_tags: dict) -> tuple[float, str] | None:
        differs = scored_differently(champion_tags, metrics)
        if not differs and "test_bpb" in champion_tags:
            return None
        why = differs or "it has no test_bpb"
        log(f"champion {champion_uri} was scored differently ({why}): re-evaluating it as this model was")
        stride = metrics.get("test_window_stride")
        return reevaluate_bpb(champion_uri, layout.clean / "test.jsonl", stride), why

    return rescore


# --- the version's tags and card -------------------------------------------------------------------


def version_tags(metrics: dict, run_id: str, n_params: int, layout: Layout) -> dict[str, str]:
    tags = {
        "git_commit": git_commit() or "unknown",
        "run_id": run_id,
        Tag.TRAINING_RUN: training_run_id(layout.model) or "unknown",
        "parameters": str(n_params),
        Tag.TOKENIZER: str(metrics.get("tokenizer_sha256")),
        Tag.TEST_DATA: metrics["test_data_sha256"],
        Tag.STRIDE: str(metrics.get("test_window_stride")),
        Tag.SCORER: SCORER,  # with the two above: how test_bpb was measured (scored_differently)
    }
    for path, digest in input_hashes(
        [layout.key(p) for p in (layout.clean, layout.tokenizer, layout.tokens)], layout.dvc_lock, layout.root
    ).items():
        tags[f"{Tag.DVC_HASH}{path}"] = digest
    flat = flat_metrics(metrics)
    for key, value in flat.items():
        if key in HEADLINE_METRICS or ".0shot." in key:
            tags[key] = f"{value:.6g}"
    return tags


def training_metrics(client, run_id: str) -> dict:
    """The training run's final metrics for the model card; {} when the run is unknown or not in this store."""
    if run_id == "unknown":
        return {}
    try:
        logged = client.get_run(run_id).data.metrics
    except MlflowException:
        log(f"warning: training run {run_id} is not in {client.tracking_uri}; the model card leaves out its metrics")
        return {}
    return {k.removeprefix("final_"): v for k, v in logged.items() if k.startswith("final_")}


def registration_key(metrics: dict, training_run: str) -> str:
    """What makes two runs the same registration: the same model bytes (model_sha256), training run and
    evaluation (metrics/eval.json + evaluated.json). A rerun after a crash finds its version by this tag."""
    blob = json.dumps({"training_run_id": training_run, "evaluation": metrics}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def card_writer(name: str, tags: dict[str, str], metrics: dict, train_metrics: dict, layout: Layout):
    """The subject's card: render_card on this model's config, metrics, lineage and samples."""
    config = json.loads((layout.model / "config.json").read_text()).get("quill_config", {})
    samples = json.loads(layout.eval_samples.read_text()) if layout.eval_samples.is_file() else []
    lineage = {
        k: v
        for k, v in tags.items()
        if k in ("git_commit", "training_run_id", "tokenizer_sha256", "test_data_sha256", "model_sha256")
        or k.startswith(Tag.DVC_HASH)
    }

    def card(version: str, decision: dict) -> str:
        n_params = int(tags["parameters"])
        return render_card(name, version, config, n_params, metrics, train_metrics, lineage, samples, decision)

    return card


# --- the stage ------------------------------------------------------------------------------------


def register(params: RegistryParams, layout: Layout = PROJECT) -> dict:
    """Register artifacts/model as a version of registry.model_name, decide its champion, write
    artifacts/registered.json; return its content. A rerun after a crash finishes the same registration."""
    metrics = read_evaluation(layout)
    uri = check_tracking()
    mlflow.set_tracking_uri(uri)
    client = tracking.mlflow_client(uri)
    run_id = registered_run(
        client,
        metrics.get("mlflow_run_id"),
        "the evaluation",
        "rerun the evaluate stage against this tracking store (dvc repro evaluate -f)",
    )
    tags = version_tags(metrics, run_id, load_pretrained(layout.model).num_params(), layout)
    tags["model_sha256"] = metrics["model_sha256"]
    tags[Tag.REGISTRATION_KEY] = registration_key(metrics, tags[Tag.TRAINING_RUN])
    train_metrics = training_metrics(client, tags[Tag.TRAINING_RUN])  # read before anything is registered
    subject = Subject(
        name=params.model_name,
        model=layout.model,
        registered=layout.registered,
        metric="test_bpb",
        value=metrics["test_bpb"],
        run_id=run_id,
        tags=tags,
        rescore=rescorer(metrics, layout),
        card=card_writer(params.model_name, tags, metrics, train_metrics, layout),
        log=log,
    )
    return register_subject(subject, params, uri)


def summarize(params: Params, layout: Layout) -> str:
    """Register artifacts/model and decide on the champion; the line printed on success."""
    result = register(params.registry, layout)
    return (
        f"{result['model_name']} v{result['version']} {result['aliases']}: "
        f"{'promoted' if result['promoted'] else 'not promoted'} ({result['why']})"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.register [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("register", summarize, argv)
