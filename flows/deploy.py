"""Deployments of quill's flows, served from this process: they appear in the Prefect UI with a Run button.

    python -m flows.deploy [--cron "0 3 * * *"] [--set serve.host=0.0.0.0 ...]

Run it from the repository root with PREFECT_API_URL pointing at the server (`make run` starts one on
127.0.0.1:4200). It blocks and runs each flow run the UI (or the API, or a schedule) asks for, in a
subprocess in this folder. `--cron` schedules train_and_deploy (e.g. a nightly retrain that, through DVC,
only redoes what changed). train_and_deploy's deployment has a concurrency limit of 1: a second run waits
for the first (flows/lock.py refuses overlapping runs started any other way). `--set` gives the Run form's
overrides their defaults (docker-compose.yml serves on 0.0.0.0 inside its network this way).
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.models import evaluate_model, promote_model, serve_model
from flows.overrides import Overrides, check, parse_sets
from flows.train_and_deploy import train_and_deploy
from pipelines.common.params import ParamsError

NAME = "quill"  # each deployment is <flow name>/quill


def deployments(cron: str | None = None, defaults: dict | None = None) -> list:
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    return [
        train_and_deploy.to_deployment(
            NAME,
            cron=cron,
            concurrency_limit=one_at_a_time,
            tags=["quill"],
            parameters={"overrides": Overrides.from_dotted(defaults or {}).model_dump(exclude_none=True)},
            description="data -> train -> evaluate -> register through DVC, then deploy the champion",
        ),
        evaluate_model.to_deployment(NAME, tags=["quill"], description="evaluate a registered version"),
        promote_model.to_deployment(NAME, tags=["quill"], description="move champion to a version, redeploy"),
        serve_model.to_deployment(NAME, tags=["quill"], description="deploy a model on Ray Serve"),
    ]


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
    serve(*deployments(args.cron, defaults))


if __name__ == "__main__":
    main()
