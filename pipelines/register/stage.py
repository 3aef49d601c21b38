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
     of data and tokenizer, training run id, parameter count, headline metrics, the decision) and the
     model card as its description; aliases `challenger` / `champion`.
Run: python -m pipelines.register     (or `dvc repro register`)

The rule: the new version becomes `champion` if there is none, or if its test_bpb beats the champion's by
at least registry.min_improvement on the same test split. If the champion was evaluated on a different
test split (another data hash), the champion is re-evaluated on the current split first. Otherwise it
keeps `challenger`. registry.force_promote promotes regardless, and says so.

Concurrent registrations of one name get distinct versions from MLflow; the read-decide-set of the
champion alias runs under a lock that works against any tracking store: a registered model named
`<model_name>.registration-lock`, whose creation fails while it exists (it is deleted afterwards, and
taken over when older than registry.lock_timeout_s).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from model import Engine, load_pretrained
from pipelines.common import tracking
from pipelines.common.atomic import write_json
from pipelines.common.contracts import HF_MODEL_PATH
from pipelines.common.hashing import content_hash
from pipelines.common.heldout import held_out, read_texts
from pipelines.common.model_folder import check_model_dir
from pipelines.common.params import Params, RegistryParams
from pipelines.common.runner import StageError, run_stage
from pipelines.common.tracking import check_tracking, flat_metrics, git_commit, input_hashes, training_run_id
from pipelines.register import pyfunc_model
from pipelines.register.model_card import render_card

CHAMPION, CHALLENGER = "champion", "challenger"
HEADLINE = ("test_bpb", "test_loss", "test_ppl")  # also every task's 0-shot scores


@dataclass(frozen=True)
class Paths:
    model: Path = Path("artifacts/model")
    metrics: Path = Path("metrics/eval.json")
    evaluated: Path = Path("reports/eval/evaluated.json")
    samples: Path = Path("reports/eval/samples.json")
    clean: Path = Path("data/clean")  # read only when the champion must be re-evaluated on a changed split
    out: Path = Path("artifacts/registered.json")
    lock_file: Path = Path("dvc.lock")


class RegisterError(StageError):
    """Registration cannot proceed; the message says why and what to do."""


def log(msg: str) -> None:
    print(f"register: {msg}", file=sys.stderr, flush=True)


# --- checks ----------------------------------------------------------------------------------------


def read_evaluation(paths: Paths) -> dict:
    """metrics/eval.json, after checking it is complete and describes the model in artifacts/model."""
    check_model_dir(paths.model)
    if not paths.metrics.is_file():
        raise RegisterError(f"{paths.metrics} missing: run the evaluate stage first (dvc repro evaluate)")
    if not paths.evaluated.is_file():
        raise RegisterError(f"{paths.evaluated} missing: rerun the evaluate stage (dvc repro evaluate)")
    metrics = {**json.loads(paths.metrics.read_text()), **json.loads(paths.evaluated.read_text())}
    missing = [k for k in ("test_bpb", "model_sha256", "test_data_sha256") if k not in metrics]
    if missing:
        raise RegisterError(f"{paths.metrics} lacks {missing}: rerun the evaluate stage (dvc repro evaluate)")
    if metrics["model_sha256"] != content_hash(paths.model / "model.safetensors"):
        raise RegisterError(f"{paths.metrics} describes another model than {paths.model}: "
                            "rerun the evaluate stage (dvc repro evaluate)")
    return metrics


# --- the lock --------------------------------------------------------------------------------------


class RegistrationLock:
    """Mutual exclusion per model name through the registry itself (creating a name is atomic)."""

    def __init__(self, client, name: str, timeout_s: float):
        self.client, self.name, self.timeout_s = client, f"{name}.registration-lock", timeout_s

    def __enter__(self):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(self.name, description="held while a quill registration "
                                                    "decides the champion; safe to delete if none is running")
                return self
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                    raise
            try:
                held = self.client.get_registered_model(self.name)
                age_s = time.time() - held.creation_timestamp / 1000
            except MlflowException:
                continue  # released meanwhile
            if age_s > self.timeout_s:
                log(f"taking over a stale lock {self.name} ({age_s:.0f} s old)")
                self._release()
                continue
            if time.monotonic() > deadline:
                raise RegisterError(f"another registration of this model holds {self.name} (for {age_s:.0f} s); "
                                    "wait for it, or delete that registered model if none is running")
            time.sleep(0.2)

    def _release(self) -> None:
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException:
            pass

    def __exit__(self, *exc) -> None:
        self._release()


# --- the decision ----------------------------------------------------------------------------------


def champion_of(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def reevaluate_bpb(model_uri: str, test_file: Path, stride: int | None) -> float:
    """The champion's bits per byte on the current test split (its own tokenizer), same windows as evaluate."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    engine = Engine.from_pretrained(local / HF_MODEL_PATH)
    texts = read_texts(test_file)
    docs = [engine.encode(t) for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return held_out(engine.model, docs, engine.eos_token_id, n_bytes, stride, 16, desc="champion on new split")["test_bpb"]


def decide(client, name: str, version: str, metrics: dict, params: RegistryParams, paths: Paths) -> dict:
    """Promote or not, with the reason; called under the registration lock."""
    bpb = metrics["test_bpb"]
    champion = champion_of(client, name)
    decision = {"promoted": False, "forced": False, "champion_version": None, "champion_test_bpb": None}
    if champion is not None:
        decision["champion_version"] = str(champion.version)
        decision["champion_test_bpb"] = float(champion.tags["test_bpb"]) if "test_bpb" in champion.tags else None
    if params.force_promote:
        return {**decision, "promoted": True, "forced": True,
                "why": "forced by registry.force_promote" + (f" (replacing v{champion.version})" if champion else "")}
    if champion is None:
        return {**decision, "promoted": True, "why": "first model: no champion existed"}
    if champion.tags.get("test_data_sha256") != metrics["test_data_sha256"] or decision["champion_test_bpb"] is None:
        log(f"champion v{champion.version} was evaluated on another test split: re-evaluating it on this one")
        decision["champion_test_bpb"] = reevaluate_bpb(f"models:/{name}/{champion.version}",
                                                       paths.clean / "test.jsonl", metrics.get("test_window_stride"))
        where = "re-evaluated on the current test split (the data changed)"
    else:
        where = "on the same test split"
    gain = decision["champion_test_bpb"] - bpb
    verdict = (f"test_bpb {bpb:.4f} vs champion v{champion.version} {decision['champion_test_bpb']:.4f} {where}: "
               f"improvement {gain:+.4f}")
    if gain >= params.min_improvement:
        return {**decision, "promoted": True, "why": f"{verdict} >= registry.min_improvement {params.min_improvement}"}
    return {**decision, "why": f"{verdict} < registry.min_improvement {params.min_improvement}"}


# --- logging the model -----------------------------------------------------------------------------


def version_tags(metrics: dict, run_id: str, n_params: int, paths: Paths) -> dict[str, str]:
    tags = {
        "git_commit": git_commit() or "unknown",
        "run_id": run_id,
        "training_run_id": training_run_id(paths.model) or "unknown",
        "parameters": str(n_params),
        "tokenizer_sha256": str(metrics.get("tokenizer_sha256")),
        "test_data_sha256": metrics["test_data_sha256"],
    }
    for path, digest in input_hashes(["data/clean", "data/tokenizer", "data/tokens"], paths.lock_file).items():
        tags[f"dvc_hash.{path}"] = digest
    flat = flat_metrics(metrics)
    for key, value in flat.items():
        if key in HEADLINE or ".0shot." in key:
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
                name="quill_pyfunc", python_model=pyfunc_model.__file__, artifacts={pyfunc_model.HF_ARTIFACT: str(staged)},
                signature=signature, pip_requirements=[], metadata={"hf_model_path": pyfunc_model.HF_MODEL_PATH},
            )


def register(params: RegistryParams, paths: Paths = Paths()) -> dict:
    """Log, register, decide, write artifacts/registered.json; return its content."""
    metrics = read_evaluation(paths)
    uri = check_tracking()
    mlflow.set_tracking_uri(uri)
    client = tracking.mlflow_client(uri)
    run_id = metrics.get("mlflow_run_id")
    try:
        client.get_run(run_id) if run_id else None
    except MlflowException:
        run_id = None
    if run_id is None:
        raise RegisterError(f"the evaluation's MLflow run {metrics.get('mlflow_run_id')} is not in {uri}: "
                            "rerun the evaluate stage against this tracking store (dvc repro evaluate -f)")
    config = json.loads((paths.model / "config.json").read_text()).get("quill_config", {})
    n_params = load_pretrained(paths.model).num_params()

    tags = version_tags(metrics, run_id, n_params, paths)
    train_metrics = training_metrics(client, tags["training_run_id"])  # read before anything is registered

    log(f"logging the pyfunc model to run {run_id}")
    info = log_pyfunc(paths.model, run_id, ["To be, or not to be"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = mlflow.register_model(info.model_uri, params.model_name, tags=tags).version
    log(f"registered {params.model_name} v{version}")
    client.set_registered_model_alias(params.model_name, CHALLENGER, version)

    with RegistrationLock(client, params.model_name, params.lock_timeout_s):
        decision = decide(client, params.model_name, version, metrics, params, paths)
        if decision["promoted"]:
            client.set_registered_model_alias(params.model_name, CHAMPION, version)
            client.delete_registered_model_alias(params.model_name, CHALLENGER)
    client.set_model_version_tag(params.model_name, version, "promoted", str(decision["promoted"]).lower())
    client.set_model_version_tag(params.model_name, version, "promotion_reason", decision["why"])
    client.set_model_version_tag(params.model_name, version, "forced", str(decision["forced"]).lower())

    samples = json.loads(paths.samples.read_text()) if paths.samples.is_file() else []
    lineage = {k: v for k, v in tags.items() if k in ("git_commit", "training_run_id", "tokenizer_sha256",
                                                        "test_data_sha256") or k.startswith("dvc_hash.")}
    card = render_card(params.model_name, version, config, n_params, metrics, train_metrics, lineage, samples, decision)
    client.update_model_version(params.model_name, version, description=card)
    client.log_text(run_id, card, f"model_card_v{version}.md")

    aliases = client.get_model_version(params.model_name, version).aliases
    result = {
        "model_name": params.model_name, "version": str(version), "model_uri": f"models:/{params.model_name}/{version}",
        "aliases": sorted(aliases), "run_id": run_id, "tracking_uri": uri, "test_bpb": metrics["test_bpb"], **decision,
    }
    write_json(paths.out, result)
    return result


def summarize(params: Params) -> str:
    """Register artifacts/model and decide on the champion; the line printed on success."""
    result = register(params.registry)
    return (f"{result['model_name']} v{result['version']} {result['aliases']}: "
            f"{'promoted' if result['promoted'] else 'not promoted'} ({result['why']})")


def main() -> int:
    """`python -m pipelines.register`: the exit status (pipelines/common/runner.py)."""
    return run_stage("register", summarize)
