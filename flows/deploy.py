"""Deployments of quill's flows, served from this process: they appear in the Prefect UI with a Run button.

    python -m flows.deploy [--cron "0 3 * * *"] [--set serve.host=0.0.0.0 ...]

Run it from the repository root with PREFECT_API_URL pointing at the server (`make run` starts one on
127.0.0.1:4200). It blocks and runs each flow run the UI (or the API, or a schedule) asks for, in a
subprocess in this folder. The deployments are named for what they do (DEPLOYMENTS: train_and_deploy's is
`train_and_deploy/train-and-deploy`). `--cron` schedules train_and_deploy (e.g. a nightly retrain that,
through DVC, only redoes what changed). train_and_deploy's deployment has a concurrency limit of 1: a second
run waits for the first (flows/lock.py refuses overlapping runs started any other way).

train_and_deploy's Run form shows every knob at the value params.yaml holds (`form_defaults`): params.yaml stays
the one place that holds them; the deployment's parameters are a copy this process renews whenever the file
changes (`watch`), so the form, a schedule and an API run without parameters run what the file says. `--set`
gives knobs other defaults (docker-compose.yml serves on 0.0.0.0 inside its network this way).
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import Any

from prefect import get_client, serve
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.finetune_and_deploy import FinetuneOverrides, finetune_and_deploy
from flows.models import evaluate_model, promote_model, serve_model
from flows.overrides import KNOBS, ORIGINAL, check, parse_sets
from flows.train_and_deploy import RunOverrides, train_and_deploy
from pipelines.common.params import PARAMS_FILE, ParamsError

# flow name -> its deployment's name, which the UI's deployment list shows beside the flow's
DEPLOYMENTS = {
    "train_and_deploy": "train-and-deploy",
    "finetune_and_deploy": "finetune-and-deploy",
    "evaluate_model": "evaluate-version",
    "promote_model": "promote-version",
    "serve_model": "serve-model",
}
WATCH_EVERY_S = 2.0


# flow name -> the model of its `overrides` parameter (its Run form's knobs)
FORMS = {"train_and_deploy": RunOverrides, "finetune_and_deploy": FinetuneOverrides}


def form_defaults(sets: dict[str, Any] | None = None, flow: str = "train_and_deploy") -> dict[str, Any]:
    """A flow's `overrides` as its Run form shows them: every knob at params.yaml's value (the user's file: the
    original while a run holds its overrides in it), `sets` on top, other `sets` keys in `other`."""
    sets = sets or {}
    params = check(sets, ORIGINAL if ORIGINAL.is_file() else PARAMS_FILE)
    form = FORMS[flow]
    knobs = {
        f"{section}.{name}": getattr(getattr(params, section), name)
        for section, (_, names) in KNOBS.items()
        if section in form.model_fields and getattr(params, section) is not None  # finetune may be absent
        for name in names
    }
    return form.from_dotted({**knobs, **sets}).model_dump(mode="json")


def all_form_defaults(sets: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {flow: form_defaults(sets, flow) for flow in FORMS}


def deployments(cron: str | None = None, defaults: dict | None = None) -> list:
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    return [
        train_and_deploy.to_deployment(
            DEPLOYMENTS["train_and_deploy"],
            cron=cron,
            concurrency_limit=one_at_a_time,
            tags=["quill"],
            parameters={"overrides": form_defaults(defaults)},
            description="data -> train -> evaluate -> register, then fine-tune for chat, through DVC; deploy",
        ),
        finetune_and_deploy.to_deployment(
            DEPLOYMENTS["finetune_and_deploy"],
            concurrency_limit=one_at_a_time,
            tags=["quill"],
            parameters={"overrides": form_defaults(defaults, "finetune_and_deploy")},
            description="chat data -> finetune -> chat_eval -> chat_register through DVC, then deploy",
        ),
        evaluate_model.to_deployment(
            DEPLOYMENTS["evaluate_model"], tags=["quill"], description="evaluate a registered version"
        ),
        promote_model.to_deployment(
            DEPLOYMENTS["promote_model"], tags=["quill"], description="move champion to a version, redeploy"
        ),
        serve_model.to_deployment(
            DEPLOYMENTS["serve_model"], tags=["quill"], description="deploy a model on Ray Serve"
        ),
    ]


def push_form_defaults(forms: dict[str, dict[str, Any]]) -> None:
    """Give each flow's deployment its Run-form defaults, {flow: overrides} (its other parameters keep theirs)."""
    with get_client(sync_client=True) as client:
        for flow, overrides in forms.items():
            deployment = client.read_deployment_by_name(f"{flow}/{DEPLOYMENTS[flow]}")
            parameters = {**deployment.parameters, "overrides": overrides}
            client.update_deployment(deployment.id, DeploymentUpdate(parameters=parameters))


def watch(
    sets: dict[str, Any],
    push: Callable[[dict[str, dict[str, Any]]], None] = push_form_defaults,
    every_s: float = WATCH_EVERY_S,
    stop: threading.Event | None = None,
) -> None:
    """Every `every_s`, push all_form_defaults(sets) when they differ from the last ones pushed (params.yaml
    changed). A params.yaml that does not validate (half edited) keeps the last defaults; a failed push is tried
    again."""
    stop = stop or threading.Event()
    last = all_form_defaults(sets)
    while not stop.wait(every_s):
        try:
            now = all_form_defaults(sets)
        except (ParamsError, OSError):
            continue
        if now == last:
            continue
        try:
            push(now)
        except Exception as exc:  # the server restarting, say: the next change (or tick) tries again
            print(f"flows.deploy: could not renew the Run form's defaults: {exc}", file=sys.stderr, flush=True)
            continue
        last = now


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron", help="a schedule for train_and_deploy, e.g. '0 3 * * *' (nightly at 03:00)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a default override of train_and_deploy's Run form, e.g. serve.host=0.0.0.0",
    )
    args = parser.parse_args(argv)
    try:
        defaults = parse_sets(args.sets)
        check(defaults)  # a bad default fails here, with the key's name
    except (ParamsError, ValueError) as exc:
        parser.error(str(exc))
    threading.Thread(target=watch, args=(defaults,), name="params-watch", daemon=True).start()
    serve(*deployments(args.cron, defaults))


if __name__ == "__main__":
    main()
