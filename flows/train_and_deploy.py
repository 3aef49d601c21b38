"""train_and_deploy: the dvc.yaml stages through DVC, then the champion on Ray Serve and a smoke test.

Each task is one `dvc repro <stage>`, so DVC skips what is up to date and keeps every output versioned; the
flow adds what DVC does not do: typed overrides from the Prefect UI (checked before any work), retries (train
resumes from its last checkpoint), progress artifacts (flows.tasks.progress_key: train's from its start, another
stage's once it reports progress), an optional approval pause before the registry decides, a Markdown summary,
and the deploy. One run per workspace (flows/lock.py). Each stage's task ends with one line saying what the
stage did (pipelines/summary.py's), or that DVC found it up to date.

    python -m flows.train_and_deploy [--set train.max_steps=200 ...] [--require-approval] [--no-deploy]

With PREFECT_API_URL set the run shows in that server's UI; `python -m flows.deploy` serves it with a Run button.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from flows.chat import chat_registered, chat_stages
from flows.lock import workspace_lock
from flows.overrides import Overrides, check, overridden, parse_sets, recover
from flows.registry import move_champion
from flows.report import print_outcome, registered, summary_markdown
from flows.repro import StageFailed, stale
from flows.serving import endpoint, serve_cli, served_version, smoke_test
from flows.tasks import run_stage, train
from pipelines.common.contracts import CHAMPION, HEADLINE_METRICS
from pipelines.common.layout import PROJECT
from pipelines.common.params import ParamsError, ServeParams, _model_config_module
from pipelines.common.tracking import RUN_FILE, mlflow_client, tracking_uri, version_by_alias

# model/config.py's preset names, read without importing torch as params.py reads them (it checks the name)
PRESETS = tuple(_model_config_module().PRESETS)
_ModelKnobs = Overrides.model_fields["model"].annotation


class ModelKnobs(_ModelKnobs):
    """The model's size: one of model/config.py's presets."""

    preset: Literal[PRESETS] | None = Field(default=None, description=_ModelKnobs.model_fields["preset"].description)


class RunOverrides(Overrides):
    """Values that replace params.yaml's for one run; unset fields keep params.yaml's. (flows/overrides.py's
    Overrides, with model.preset a choice of the presets.)"""

    model: ModelKnobs = Field(default_factory=ModelKnobs, description="model knobs")


NO_OVERRIDES = RunOverrides()
PAUSE_GRACE_S = 120  # Prefect's pause timeout past the approval deadline (see wait_for_approval)
TRAIN_RUN = PROJECT.model / RUN_FILE  # the train stage's MLflow run id (pipelines/common/tracking.py)


class Approval(RunInput):
    """A reviewer's answer to the pause after registration (the new version waits as challenger)."""

    approve: bool = Field(description="promote this version if the registry rule (registry.min_improvement) says so")
    force: bool = Field(default=False, description="promote it even if the rule says no")
    comment: str = Field(default="", description="why (kept in the run's summary)")


def stages() -> list[str]:
    """The stage names of dvc.yaml, in its order (the base model's, ingest to register, then the chat model's)."""
    return list(yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"])


@task(retries=0)
def needs_registration(overrides: dict[str, Any]) -> bool:
    """Whether `dvc repro register` would run (a new evaluation, or none registered yet)."""
    with overridden(overrides):
        return stale("register")


@task(retries=0)
def comparison(reg: dict) -> str:
    """The version just registered beside the champion's registered numbers, as Markdown for the reviewer."""
    evaluated = json.loads(PROJECT.eval_metrics.read_text())
    name = reg["model_name"]
    client = mlflow_client()
    champion = version_by_alias(client, name, CHAMPION)
    rows = ["| metric | this model | champion |", "|---|---|---|"]
    for key in HEADLINE_METRICS:
        theirs = champion.tags.get(key, "?") if champion else "none yet"
        rows.append(f"| {key} | {evaluated[key]:.4f} | {theirs} |")
    who = f"{name} v{champion.version}" if champion else "no champion yet"
    verdict = "promote" if reg.get("would_promote") else "keep the champion"
    return (
        f"{name} v{reg['version']} is registered as challenger. Champion: {who}. The registry rule says: {verdict} "
        f"({reg['why'].split('; the rule says promote: ')[-1]}). Approve to follow the rule, force to promote anyway; "
        "reject, or no answer in time, leaves it challenger.\n\n" + "\n".join(rows)
    )


@task(retries=0)
def record_in_mlflow(run_id: str, overrides: dict[str, Any]) -> None:
    """Tag the training run with this flow run and its overrides (the params it logged already hold the values)."""
    client = mlflow_client()
    client.set_tag(run_id, "quill.flow_run_id", str(flow_run.id))
    client.set_tag(run_id, "quill.flow_run_name", str(flow_run.name))
    client.set_tag(run_id, "quill.overrides", json.dumps(overrides, sort_keys=True))


@task(retries=1, retry_delay_seconds=10)
def deploy_champion(overrides: dict[str, Any], serve: ServeParams, model_name: str) -> str | None:
    """Deploy (rolling update) the champion unless the endpoint serves it already; the endpoint, or None."""
    logger = get_run_logger()
    version = version_by_alias(mlflow_client(), model_name, CHAMPION)
    if version is None:
        logger.warning(f"no champion of {model_name} in the registry: nothing to deploy")
        return None
    champion = str(version.version)
    url = endpoint(serve)
    if serve.model is None and served_version(url) == champion:
        logger.info(f"{url} already serves {model_name} v{champion}")
        return url
    with overridden(overrides):
        result = serve_cli()
    for line in (result.stdout + result.stderr).splitlines():
        logger.info(line)
    if result.returncode != 0:
        raise RuntimeError(f"python -m pipelines.serve failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return url


@task(retries=3, retry_delay_seconds=5)
def smoke(url: str) -> str:
    """The live endpoint answers /health, /v1/models, a completion (and a chat reply, with a chat model served
    beside the base); a line saying what it served."""
    result = smoke_test(url)
    line = f"{result.model} (version {result.version}) at {url} completed 'The king' with {result.completion!r}"
    return line + (f"; {result.chat_model} answered it with {result.chat!r}" if result.chat_model else "")


def wait_for_approval(reg: dict, timeout_s: int) -> tuple[Approval, bool]:
    """The reviewer's Approval, and whether nobody answered within timeout_s.

    At the deadline this process resumes its own run with a refusal. Letting Prefect's pause timeout expire
    instead would make the server fail the run's next state change (an expired pause cannot be resumed), so an
    unanswered review would end the run Failed although nothing failed. Whichever resume reaches the server
    first wins; the other is answered "not paused"."""
    run_id = flow_run.get_id()
    unanswered = Approval(approve=False, comment=f"no answer within {timeout_s} s")

    def expire() -> None:
        try:
            resume_flow_run(run_id, run_input=unanswered.model_dump())
        except (NotPausedError, FlowPauseTimeout, RuntimeError):
            pass  # a reviewer answered first

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        # Prefect's own timeout is only the backstop should this process's resume never reach the server
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=comparison(reg)), timeout=timeout_s + PAUSE_GRACE_S
        )
    except FlowPauseTimeout:
        return unanswered, True
    finally:
        timer.cancel()
    return answer, answer.model_dump() == unanswered.model_dump()  # fields only: a loaded input carries metadata


def review(reg: dict, timeout_s: int) -> str:
    """Pause for a reviewer's Approval; promote the new version if they approve and the rule agrees, or force it.
    What happened, in a line (rejected or unanswered: the version stays challenger)."""
    answer, unanswered = wait_for_approval(reg, timeout_s)
    if unanswered:
        return f"no answer within {timeout_s} s: v{reg['version']} stays challenger"
    note = f" ({answer.comment})" if answer.comment else ""
    if not answer.approve:
        return f"rejected{note}: v{reg['version']} stays challenger"
    if not (answer.force or reg.get("would_promote")):
        return f"approved{note}, but the rule keeps the champion: v{reg['version']} stays challenger (force to promote)"
    move_champion(reg["version"], "approved" + (" (forced)" if answer.force else "") + " in train_and_deploy")
    return f"approved{' (forced)' if answer.force else ''}{note}: v{reg['version']} promoted to champion"


@flow(name="train_and_deploy", log_prints=True)
def train_and_deploy(
    overrides: RunOverrides = NO_OVERRIDES,
    require_approval: bool = False,
    approval_timeout_s: int = Field(default=3600, ge=10, description="seconds to wait for a reviewer"),
    deploy: bool = True,
    finetune: bool = Field(default=True, description="then fine-tune, evaluate and register the chat model"),
) -> dict[str, Any]:
    """The dvc.yaml pipeline through DVC with this run's overrides (the base model's stages, then the chat model's
    unless finetune is off or params.yaml has no finetune section), then deploy the champions and smoke-test."""
    logger = get_run_logger()
    dotted = overrides.dotted()
    params = check(dotted)  # bad keys, types and ranges stop the run here, before any work
    with workspace_lock(f"flow run {flow_run.name} ({flow_run.id})"):
        if recover():
            logger.warning("params.yaml held a killed run's overrides: the original is back")
        ran: dict[str, bool] = {}
        for stage in stages():
            if stage == "train":
                ran[stage] = train(dotted)
            elif stage == "register":
                break  # the chat model's stages follow register in dvc.yaml: below
            else:
                ran[stage] = run_stage(stage, dotted)
        if ran.get("train"):
            record_in_mlflow(json.loads(TRAIN_RUN.read_text())["mlflow_run_id"], dotted)
        approval = None
        if require_approval and needs_registration(dotted):
            # registered as challenger with the rule's verdict recorded; only a reviewer moves champion
            ran["register"] = run_stage("register", {**dotted, "registry.promotion": "manual"})
            approval = review(registered(), approval_timeout_s)
            logger.info(f"approval: {approval}")
        else:
            ran["register"] = run_stage("register", dotted)
        reg = registered()
        chat = None
        if finetune and params.finetune is not None:
            ran.update(chat_stages(dotted))
            chat = chat_registered()
        served = None
        if deploy and (approval is None or approval.startswith("approved")):
            url = deploy_champion(dotted, params.serve, params.registry.model_name)
            served = smoke(url) if url else None
        experiment = mlflow_client().get_run(reg["run_id"]).info.experiment_id if reg else None
        create_markdown_artifact(
            summary_markdown(
                ran,
                dotted,
                reg,
                experiment,
                tracking_uri(),
                approval,
                served,
                chat,
            ),
            key="train-and-deploy-summary",
            description="stages, evaluation, registry decision, endpoint",
        )
    return {"ran": ran, "registered": reg, "chat_registered": chat, "approval": approval, "served": served}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value for this run (YAML value), e.g. train.max_steps=200",
    )
    parser.add_argument("--require-approval", action="store_true", help="pause after evaluate for a reviewer")
    parser.add_argument("--approval-timeout-s", type=int, default=3600)
    parser.add_argument("--no-deploy", dest="deploy", action="store_false", help="stop after the registrations")
    parser.add_argument(
        "--no-finetune", dest="finetune", action="store_false", help="skip the chat model's stages (after register)"
    )
    args = parser.parse_args(argv)
    try:
        overrides = RunOverrides.from_dotted(parse_sets(args.sets))
        check(overrides.dotted())
    except (ParamsError, ValueError) as exc:
        print(f"train_and_deploy: refused before any work: {exc}", file=sys.stderr)
        return 2
    try:
        result = train_and_deploy(overrides, args.require_approval, args.approval_timeout_s, args.deploy, args.finetune)
    except (StageFailed, RuntimeError, OSError) as exc:
        print(f"train_and_deploy failed: {exc}", file=sys.stderr)
        return 1
    print_outcome([result["registered"], result["chat_registered"]], result["served"], tracking_uri())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
