"""Register an evaluated model folder as a new MLflow model version once, and decide whether it becomes champion.

The register stage (the base model, gate test_bpb) and the chat_register stage (the chat model, gate response
bits per byte) describe what they register as a `Subject`; everything else is here:

    >>> result = register_subject(subject, params.registry)   # -> the dict written to subject.registered

The rule: the new version becomes `champion` if there is none, or if its gate metric (lower is better) beats the
champion's by at least registry.min_improvement, both scored the same way: a champion scored differently (another
test split, stride or scorer, as the subject's `rescore` tells) is scored again as the new model was. Otherwise it
keeps `challenger`. registry.force_promote promotes regardless, and says so; registry.promotion manual records the
verdict (`would_promote`) and leaves the move to a reviewer.

Concurrent registrations of one name get distinct versions; registering a version, the champion decision and both
aliases run under a lock that works against any tracking store (lock.py). A rerun after a crash anywhere in here
finds the version it registered (tag `registration_key`) and finishes it instead of registering a duplicate.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipelines.common import tracking
from pipelines.common.atomic import write_json
from pipelines.common.contracts import CHALLENGER, CHAMPION, Tag
from pipelines.common.errors import StageError
from pipelines.common.params import RegistryParams
from pipelines.common.registration import pyfunc_model
from pipelines.common.registration.lock import LockLost, RegistrationLock, error_code
from pipelines.common.tracking import version_by_alias

# (champion's model URI, champion's tags) -> None when its recorded metric compares with this evaluation, else
# (its metric scored as this version was, why it had to be)
Rescore = Callable[[str, dict], "tuple[float, str] | None"]


@dataclass(frozen=True)
class Subject:
    """One registration: what is registered, how it was evaluated, and how its champion gate compares."""

    name: str  # the registered model
    model: Path  # the Hugging Face folder logged with the pyfunc model
    registered: Path  # where the result is written (artifacts/registered.json, artifacts/chat_registered.json)
    metric: str  # the champion gate, lower is better; also a tag of every version
    value: float  # this version's metric
    run_id: str  # the evaluation's MLflow run: the pyfunc model is logged there
    tags: dict[str, str]  # the version's tags, registration_key included
    rescore: Rescore
    card: Callable[[str, dict], str]  # (version, decision) -> the model card (Markdown)
    examples: list[str] = field(default_factory=lambda: ["To be, or not to be"])  # the signature's input example
    log: Callable[[str], None] = print


# --- the decision ----------------------------------------------------------------------------------


def decide(client, subject: Subject, version: str, params: RegistryParams) -> dict:
    """Promote or not, with the reason; called under the registration lock. With registry.promotion manual the
    rule's verdict is recorded as `would_promote` and the version waits as challenger for a reviewer."""
    decision = rule(client, subject, version, params)
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


def rule(client, subject: Subject, version: str, params: RegistryParams) -> dict:
    """The champion rule: first model, forced, or better than the champion by registry.min_improvement."""
    name, metric, value = subject.name, subject.metric, subject.value
    champion = version_by_alias(client, name, CHAMPION)
    decision = {"promoted": False, "forced": False, "champion_version": None, f"champion_{metric}": None}
    if champion is not None:
        decision["champion_version"] = str(champion.version)
        recorded = float(champion.tags[metric]) if metric in champion.tags else None
        decision[f"champion_{metric}"] = recorded
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
    rescored = subject.rescore(f"models:/{name}/{champion.version}", champion.tags)
    if rescored is not None:
        decision[f"champion_{metric}"], why = rescored
        where = f"re-evaluated on the current test split as this model was ({why})"
    else:
        where = "on the same test split, scored the same way"
    gain = decision[f"champion_{metric}"] - value
    verdict = (
        f"{metric} {value:.4f} vs champion v{champion.version} {decision[f'champion_{metric}']:.4f} {where}: "
        f"improvement {gain:+.4f}"
    )
    if gain >= params.min_improvement:
        return {**decision, "promoted": True, "why": f"{verdict} >= registry.min_improvement {params.min_improvement}"}
    return {**decision, "why": f"{verdict} < registry.min_improvement {params.min_improvement}"}


# --- logging the model -----------------------------------------------------------------------------


def log_pyfunc(model_dir: Path, run_id: str, examples: list[str]):
    """Log the pyfunc model (code + the HF folder staged as `hf_model`) to `run_id`; return its ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlflow's hints about type hints and integer columns
        signature = infer_signature(
            list(examples),  # an unnamed string column: a list, a string, {"prompt": [...]} or a DataFrame
            pd.DataFrame([[p, "", "length", 1, 1] for p in examples], columns=pyfunc_model.OUTPUT_COLUMNS),
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
    """A named point inside `register_subject` (one of CRASH_POINTS); does nothing. The crash tests in
    tests/integration/test_register.py replace it in a child process with a SIGKILL, then register again."""


CRASH_POINTS = ("logged", "registered", "decided", "champion-set", "aliases-set", "tagged", "carded")


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


def create_version(client, lock: RegistrationLock, subject: Subject, model_uri: str):
    lock.ensure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = mlflow.register_model(model_uri, subject.name, tags=subject.tags).version
    subject.log(f"registered {subject.name} v{version}")
    return client.get_model_version(subject.name, str(version))


def alias_version(client, name: str, alias: str) -> int | None:
    version = version_by_alias(client, name, alias)
    return int(version.version) if version else None


def settle(client, lock: RegistrationLock, version, subject: Subject, params: RegistryParams) -> dict:
    """Decide (or take up the decision an interrupted run recorded) and point the aliases; under the lock.

    The decision is recorded as the version's `decision` tag before any alias moves. A rerun keeps it only if
    it had already made this version champion; otherwise it decides again against the champion as it is now.
    `challenger` is the newest version not promoted: it moves only forward, and promotion removes an older one.
    """
    name, v = subject.name, str(version.version)
    pending = json.loads(version.tags[Tag.DECISION]) if Tag.DECISION in version.tags else None
    if pending and pending["promoted"] and alias_version(client, name, CHAMPION) == int(v):
        decision = pending
    else:
        decision = decide(client, subject, v, params)
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


def register_and_decide(client, subject: Subject, model_uri: str | None, params: RegistryParams):
    """Under the registration lock: find or create this registration's version, then decide the champion.
    A lost lock (another registration took it over) means deciding again, at most three times."""
    for _attempt in range(3):
        try:
            with RegistrationLock(client, subject.name, params.lock_timeout_s) as lock:
                version = find_version(client, subject.name, subject.tags[Tag.REGISTRATION_KEY])
                if version is None:  # not yet registered (or deleted since): register under the lock
                    model_uri = model_uri or log_pyfunc(subject.model, subject.run_id, subject.examples).model_uri
                    version = create_version(client, lock, subject, model_uri)
                    reached("registered")
                return version, settle(client, lock, version, subject, params)
        except LockLost as exc:
            subject.log(f"{exc}: deciding again")
    raise StageError(
        f"lost the registration lock of {subject.name} three times in a row: another registration "
        "keeps taking it over; raise registry.lock_timeout_s"
    )


def register_subject(subject: Subject, params: RegistryParams, tracking_uri: str) -> dict:
    """Log, register, decide, write subject.registered; return its content.

    Idempotent: a rerun (after a crash anywhere in here) finds the version this registration created, by its
    `registration_key` tag, and finishes what is missing (decision, aliases, tags, model card, the result file).
    The `promoted` tag is written last of the decision's tags: its presence means the decision is complete.
    """
    client = tracking.mlflow_client(tracking_uri)
    name = subject.name
    version, model_uri = find_version(client, name, subject.tags[Tag.REGISTRATION_KEY]), None
    if version is None:
        subject.log(f"logging the pyfunc model to run {subject.run_id}")
        model_uri = log_pyfunc(subject.model, subject.run_id, subject.examples).model_uri
        reached("logged")
    else:
        subject.log(f"{name} v{version.version} is this model's registration from an earlier run: finishing it")

    if version is not None and "promoted" in version.tags and Tag.DECISION in version.tags:
        decision = json.loads(version.tags[Tag.DECISION])
    else:
        version, decision = register_and_decide(client, subject, model_uri, params)
    v = str(version.version)
    client.set_model_version_tag(name, v, "promotion_reason", decision["why"])
    client.set_model_version_tag(name, v, "forced", str(decision["forced"]).lower())
    client.set_model_version_tag(name, v, "promoted", str(decision["promoted"]).lower())  # last: decision complete
    reached("tagged")
    card = subject.card(v, decision)
    client.update_model_version(name, v, description=card)
    client.log_text(subject.run_id, card, f"model_card_v{v}.md")
    reached("carded")

    aliases = client.get_model_version(name, v).aliases
    result = {
        "model_name": name,
        "version": v,
        "model_uri": f"models:/{name}/{v}",
        "aliases": sorted(aliases),
        "run_id": subject.run_id,
        "tracking_uri": tracking_uri,
        subject.metric: subject.value,
        **decision,
    }
    write_json(subject.registered, result)
    return result


def registered_run(client, run_id: str | None, what: str, rerun: str) -> str:
    """`run_id` after checking the store has it; a StageError naming `rerun` otherwise."""
    try:
        if run_id:
            client.get_run(run_id)
            return run_id
    except MlflowException:
        pass
    raise StageError(f"{what}'s MLflow run {run_id} is not in {client.tracking_uri}: {rerun}")
