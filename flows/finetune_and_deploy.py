"""finetune_and_deploy: the chat model's stages alone (chat_data -> finetune -> chat_eval -> chat_register), then
both champions on Ray Serve and a smoke test. For fine-tuning again (another method, more steps, new chat data)
without retraining the base: DVC reruns only what changed, and whatever the chat stages depend on if it is stale.

    python -m flows.finetune_and_deploy [--set finetune.method=full --set finetune.lr=2e-4 ...] [--no-deploy]

One run per workspace, shared with train_and_deploy (flows/lock.py). Its Run form offers the finetune knobs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.chat import chat_registered, chat_stages
from flows.lock import workspace_lock
from flows.overrides import check, overrides_model, parse_sets, recover
from flows.report import print_outcome, summary_markdown
from flows.repro import StageFailed
from flows.train_and_deploy import deploy_champion, smoke
from pipelines.common.params import ParamsError
from pipelines.common.tracking import tracking_uri

FinetuneOverrides = overrides_model("FinetuneOverrides", ("finetune",))
FinetuneOverrides.__doc__ = (
    "Values that replace params.yaml's for one run of the chat model's stages: the finetune knobs, and any other "
    "dotted key in `other`; unset fields keep params.yaml's."
)


NO_OVERRIDES = FinetuneOverrides()


@flow(name="finetune_and_deploy", log_prints=True)
def finetune_and_deploy(overrides: FinetuneOverrides = NO_OVERRIDES, deploy: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate and register the chat model through DVC with this run's overrides, then deploy."""
    logger = get_run_logger()
    dotted = overrides.dotted()
    params = check(dotted)  # bad keys, types and ranges stop the run here, before any work
    if params.finetune is None:
        raise ParamsError("params.yaml has no finetune section: add one (README, Fine-tuning) to fine-tune for chat")
    with workspace_lock(f"flow run {flow_run.name} ({flow_run.id})"):
        if recover():
            logger.warning("params.yaml held a killed run's overrides: the original is back")
        ran = chat_stages(dotted)
        chat = chat_registered()
        served = None
        if deploy:
            url = deploy_champion(dotted, params.serve, params.registry.model_name)
            served = smoke(url) if url else None
        create_markdown_artifact(
            summary_markdown(ran, dotted, None, None, tracking_uri(), None, served, chat, "finetune_and_deploy"),
            key="finetune-and-deploy-summary",
            description="the chat model's stages, its registry decision, endpoint",
        )
    return {"ran": ran, "chat_registered": chat, "served": served}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value for this run (YAML value), e.g. finetune.max_steps=400",
    )
    parser.add_argument("--no-deploy", dest="deploy", action="store_false", help="stop after chat_register")
    args = parser.parse_args(argv)
    try:
        overrides = FinetuneOverrides.from_dotted(parse_sets(args.sets))
        check(overrides.dotted())
    except (ParamsError, ValueError) as exc:
        print(f"finetune_and_deploy: refused before any work: {exc}", file=sys.stderr)
        return 2
    try:
        result = finetune_and_deploy(overrides, args.deploy)
    except (StageFailed, RuntimeError, OSError, ParamsError) as exc:
        print(f"finetune_and_deploy failed: {exc}", file=sys.stderr)
        return 1
    print_outcome([result["chat_registered"]], result["served"], tracking_uri())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
