"""register: log the evaluated model to MLflow as a pyfunc model, register a version, decide the champion.

In:  artifacts/model/                 the Hugging Face folder (+ quill_run.json from train)
     metrics/eval.json                the evaluate stage's numbers
     reports/eval/evaluated.json      ... and what they are of (must be this very model)
     reports/eval/samples.json        generation samples for the model card
     params.yaml `registry`           model_name, min_improvement, force_promote, lock_timeout_s
Out: artifacts/registered.json        {model_name, version, model_uri, aliases, run_id, promoted, why, forced,
                                       test_bpb, champion_version, champion_test_bpb, tracking_uri}
     MLflow: a pyfunc model logged to the evaluation's run (the HF folder under artifacts/hf_model, see
     pipelines/register/pyfunc_model.py), a new version of registry.model_name with tags (git commit, DVC hashes
     of data and tokenizer, training run id, model_sha256, registration_key, parameter count, headline metrics,
     the decision) and the
     model card as its description; aliases `challenger` / `champion`.
Run: python -m pipelines.register     (or `dvc repro register`)

The rule: the new version becomes `champion` if there is none, or if its test_bpb beats the champion's by
at least registry.min_improvement, both scored the same way. If the champion was scored differently (another
test split, another eval.stride, another version of the scorer: its version tags record all three), it is
re-evaluated on the current split as the new model was first. Otherwise the new version keeps `challenger`. registry.force_promote promotes regardless, and says so.

Concurrent registrations of one name get distinct versions; registering a version, the champion decision and
both aliases run under a lock that works against any tracking store (pipelines/register/lock.py: a registered
model `<model_name>.registration-lock` created atomically with an owner token, renewed by a heartbeat, taken
over once it stops renewing for registry.lock_timeout_s, or at once when its holder exited on this machine,
released only by its owner). A rerun after a crash
anywhere in here finds the version it registered (tag `registration_key`: model hash, training run,
evaluation) and finishes it instead of registering a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from model import Engine, load_pretrained
from pipelines.common import tracking
from pipelines.common.atomic import write_json
from pipelines.common.clean_split import read_texts
from pipelines.common.contracts import CHALLENGER, CHAMPION, HEADLINE_METRICS, HF_MODEL_PATH, Tag
from pipelines.common.hashing import content_hash
from pipelines.common.heldout import SCORER, held_out
from pipelines.common.layout import PROJECT, Layout
from pipelines.common.model_folder import check_model_dir
from pipelines.common.params import Params, RegistryParams
from pipelines.common.runner import StageError, run_stage, stage_log
from pipelines.common.tracking import (
    check_tracking,
    flat_metrics,
    git_commit,
    input_hashes,
    training_run_id,
    version_by_alias,
)
from pipelines.register import pyfunc_model
from pipelines.register.lock import LockLost, RegistrationLock, error_code
from pipelines.register.model_card import render_card


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


# --- the decision ----------------------------------------------------------------------------------


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


def decide(client, name: str, version: str, metrics: dict, params: RegistryParams, layout: Layout) -> dict:
    """Promote or not, with the reason; called under the registration lock. With registry.promotion manual the
    rule's verdict is recorded as `would_promote` and the version waits as challenger for a reviewer."""
    decision = rule(client, name, version, metrics, params, layout)
    if params.promotion == "manual" and decision["promoted"] and not decision["why"].startswith("already champion"):
        return {
            **decision,
            "promoted": False,
            "forced": False,
            "would_promote": True,
            "why": f"awaiting a reviewer (registry.promotion manual); the rule says promote: {decision['why']}",
        }
    if params.promotion == "manual":
        return {**decision, "would_promote": decision["promoted"]}
    return decision


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


def rule(client, name: str, version: str, metrics: dict, params: RegistryParams, layout: Layout) -> dict:
    """The champion rule: first model, forced, or better than the champion by registry.min_improvement."""
    bpb = metrics["test_bpb"]
    champion = version_by_alias(client, name, CHAMPION)
    decision = {"promoted": False, "forced": False, "champion_version": None, "champion_test_bpb": None}
    if champion is not None:
        decision["champion_version"] = str(champion.version)
        decision["champion_test_bpb"] = float(champion.tags["test_bpb"]) if "test_bpb" in champion.tags else None
        if str(champion.version) == str(version):  # moved here before this run's decision was recorded
            return {**decision, "promoted": True, "why": f"already champion (v{version})"}
    if params.force_promote:
        return {
            **decision,
            "promoted": True,
            "forced": True,
            "why": "forced by registry.force_promote" + (f" (replacing v{champion.version})" if champion else ""),
        }
    if champion is None:
        return {**decision, "promoted": True, "why": "first model: no champion existed"}
    differs = scored_differently(champion.tags, metrics)
    if differs or decision["champion_test_bpb"] is None:
        why = differs or "it has no test_bpb"
        log(f"champion v{champion.version} was scored differently ({why}): re-evaluating it as this model was")
        decision["champion_test_bpb"] = reevaluate_bpb(
            f"models:/{name}/{champion.version}", layout.clean / "test.jsonl", metrics.get("test_window_stride")
        )
        where = f"re-evaluated on the current test split as this model was ({why})"
    else:
        where = "on the same test split, scored the same way"
    gain = decision["champion_test_bpb"] - bpb
    verdict = (
        f"test_bpb {bpb:.4f} vs champion v{champion.version} {decision['champion_test_bpb']:.4f} {where}: "
        f"improvement {gain:+.4f}"
    )
    if gain >= params.min_improvement:
        return {**decision, "promoted": True, "why": f"{verdict} >= registry.min_improvement {params.min_improvement}"}
    return {**decision, "why": f"{verdict} < registry.min_improvement {params.min_improvement}"}


# --- logging the model -----------------------------------------------------------------------------


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


def log_pyfunc(model_dir: Path, run_id: str, n_examples: list[str]):
    """Log the pyfunc model (code + the HF folder staged as `hf_model`) to `run_id`; return its ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlflow's hints about type hints and integer columns
        signature = infer_signature(
            list(n_examples),  # an unnamed string column: a list, a string, {"prompt": [...]} or a DataFrame
            pd.DataFrame([[p, "", "length", 1, 1] for p in n_examples], columns=pyfunc_model.OUTPUT_COLUMNS),
            params=pyfunc_model.PARAMS,
        )
        staged = Path(tmp) / pyfunc_model.HF_ARTIFACT  # its name is the folder's name inside the logged model
        shutil.copytree(model_dir, staged)
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="quill_pyfunc",
                python_model=pyfunc_model.__file__,
                artifacts={pyfunc_model.HF_ARTIFACT: str(staged)},
                signature=signature,
                pip_requirements=[],
                metadata={"hf_model_path": pyfunc_model.HF_MODEL_PATH},
            )


# --- registering once, finishing after a crash ------------------------------------------------------


def reached(point: str) -> None:
    """A named point inside `register` (one of CRASH_POINTS); does nothing. The crash tests in
    tests/integration/test_register.py replace it in a child process with a SIGKILL, then rerun `register`."""


CRASH_POINTS = ("logged", "registered", "decided", "champion-set", "aliases-set", "tagged", "carded")


def registration_key(metrics: dict, training_run: str) -> str:
    """What makes two runs the same registration: the same model bytes (model_sha256), training run and
    evaluation (metrics/eval.json + evaluated.json). A rerun after a crash finds its version by this tag."""
    blob = json.dumps({"training_run_id": training_run, "evaluation": metrics}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def find_version(client, name: str, key: str):
    """The version registered earlier with this registration key (the oldest, should there be two), or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{Tag.REGISTRATION_KEY} = '{key}'")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in error_code(exc):
            return None
        raise
    if not found:
        return None
    return client.get_model_version(name, str(min(int(v.version) for v in found)))  # with its aliases


def create_version(client, lock: RegistrationLock, name: str, model_uri: str, tags: dict[str, str]):
    lock.ensure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = mlflow.register_model(model_uri, name, tags=tags).version
    log(f"registered {name} v{version}")
    return client.get_model_version(name, str(version))


def alias_version(client, name: str, alias: str) -> int | None:
    version = version_by_alias(client, name, alias)
    return int(version.version) if version else None


def settle(client, lock: RegistrationLock, version, metrics: dict, params: RegistryParams, layout: Layout) -> dict:
    """Decide (or take up the decision an interrupted run recorded) and point the aliases; under the lock.

    The decision is recorded as the version's `decision` tag before any alias moves. A rerun keeps it only if
    it had already made this version champion; otherwise it decides again against the champion as it is now.
    `challenger` is the newest version not promoted: it moves only forward, and promotion removes an older one.
    """
    name, v = params.model_name, str(version.version)
    pending = json.loads(version.tags[Tag.DECISION]) if Tag.DECISION in version.tags else None
    if pending and pending["promoted"] and alias_version(client, name, CHAMPION) == int(v):
        decision = pending
    else:
        decision = decide(client, name, v, metrics, params, layout)
        lock.ensure()
        client.set_model_version_tag(name, v, Tag.DECISION, json.dumps(decision))
        reached("decided")
    challenger = alias_version(client, name, CHALLENGER)
    if decision["promoted"]:
        lock.ensure()
        client.set_registered_model_alias(name, CHAMPION, v)
        reached("champion-set")
        if challenger is not None and challenger <= int(v):
            lock.ensure()
            client.delete_registered_model_alias(name, CHALLENGER)
    elif challenger is None or challenger < int(v):
        lock.ensure()
        client.set_registered_model_alias(name, CHALLENGER, v)
    reached("aliases-set")
    return decision


def register_and_decide(
    client,
    run_id: str,
    model_uri: str | None,
    tags: dict[str, str],
    metrics: dict,
    params: RegistryParams,
    layout: Layout,
):
    """Under the registration lock: find or create this registration's version, then decide the champion.
    A lost lock (another registration took it over) means deciding again, at most three times."""
    name = params.model_name
    for _attempt in range(3):
        try:
            with RegistrationLock(client, name, params.lock_timeout_s) as lock:
                version = find_version(client, name, tags[Tag.REGISTRATION_KEY])
                if version is None:  # not yet registered (or deleted since): register under the lock
                    model_uri = model_uri or log_pyfunc(layout.model, run_id, ["To be, or not to be"]).model_uri
                    version = create_version(client, lock, name, model_uri, tags)
                    reached("registered")
                return version, settle(client, lock, version, metrics, params, layout)
        except LockLost as exc:
            log(f"{exc}: deciding again")
    raise RegisterError(
        f"lost the registration lock of {name} three times in a row: another registration "
        "keeps taking it over; raise registry.lock_timeout_s"
    )


def write_card(
    client,
    name: str,
    version: str,
    run_id: str,
    tags: dict[str, str],
    metrics: dict,
    train_metrics: dict,
    decision: dict,
    layout: Layout,
) -> None:
    """The model card as the version's description and as a file of the run."""
    config = json.loads((layout.model / "config.json").read_text()).get("quill_config", {})
    samples = json.loads(layout.eval_samples.read_text()) if layout.eval_samples.is_file() else []
    lineage = {
        k: v
        for k, v in tags.items()
        if k in ("git_commit", "training_run_id", "tokenizer_sha256", "test_data_sha256", "model_sha256")
        or k.startswith(Tag.DVC_HASH)
    }
    card = render_card(
        name, version, config, int(tags["parameters"]), metrics, train_metrics, lineage, samples, decision
    )
    client.update_model_version(name, version, description=card)
    client.log_text(run_id, card, f"model_card_v{version}.md")
    reached("carded")


def register(params: RegistryParams, layout: Layout = PROJECT) -> dict:
    """Log, register, decide, write artifacts/registered.json; return its content.

    Idempotent: a rerun (after a crash anywhere in here) finds the version this registration created, by its
    `registration_key` tag, and finishes what is missing (decision, aliases, tags, model card, registered.json).
    The `promoted` tag is written last of the decision's tags: its presence means the decision is complete.
    """
    metrics = read_evaluation(layout)
    uri = check_tracking()
    mlflow.set_tracking_uri(uri)
    client = tracking.mlflow_client(uri)
    run_id = metrics.get("mlflow_run_id")
    try:
        client.get_run(run_id) if run_id else None
    except MlflowException:
        run_id = None
    if run_id is None:
        raise RegisterError(
            f"the evaluation's MLflow run {metrics.get('mlflow_run_id')} is not in {uri}: "
            "rerun the evaluate stage against this tracking store (dvc repro evaluate -f)"
        )
    name = params.model_name
    n_params = load_pretrained(layout.model).num_params()

    tags = version_tags(metrics, run_id, n_params, layout)
    tags["model_sha256"] = metrics["model_sha256"]
    tags[Tag.REGISTRATION_KEY] = registration_key(metrics, tags[Tag.TRAINING_RUN])
    train_metrics = training_metrics(client, tags[Tag.TRAINING_RUN])  # read before anything is registered

    version, model_uri = find_version(client, name, tags[Tag.REGISTRATION_KEY]), None
    if version is None:
        log(f"logging the pyfunc model to run {run_id}")
        model_uri = log_pyfunc(layout.model, run_id, ["To be, or not to be"]).model_uri
        reached("logged")
    else:
        log(f"{name} v{version.version} is this model's registration from an earlier run: finishing it")

    if version is not None and "promoted" in version.tags and Tag.DECISION in version.tags:
        decision = json.loads(version.tags[Tag.DECISION])
    else:
        version, decision = register_and_decide(client, run_id, model_uri, tags, metrics, params, layout)
    v = str(version.version)
    client.set_model_version_tag(name, v, "promotion_reason", decision["why"])
    client.set_model_version_tag(name, v, "forced", str(decision["forced"]).lower())
    client.set_model_version_tag(name, v, "promoted", str(decision["promoted"]).lower())  # last: decision complete
    reached("tagged")
    write_card(client, name, v, run_id, tags, metrics, train_metrics, decision, layout)

    aliases = client.get_model_version(name, v).aliases
    result = {
        "model_name": name,
        "version": v,
        "model_uri": f"models:/{name}/{v}",
        "aliases": sorted(aliases),
        "run_id": run_id,
        "tracking_uri": uri,
        "test_bpb": metrics["test_bpb"],
        **decision,
    }
    write_json(layout.registered, result)
    return result


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
