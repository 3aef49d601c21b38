"""The flows' stage tasks: each one `dvc repro <stage>` with the run's overrides, its progress lines in a Prefect
progress artifact and a closing line saying what the stage did (pipelines/summary.py's), or that DVC found it up
to date. train and finetune retry: a retry resumes from the stage's last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.overrides import overridden
from flows.repro import Repro, repro
from pipelines.summary import headline


def what_it_did(result: Repro) -> str:
    """One line: whether the stage ran (and how long) or was up to date, and what its outputs hold."""
    line = headline(Path("."), result.stage)
    did = f"ran in {result.seconds:.0f} s" if result.ran else "up to date (DVC skipped it)"
    return f"{result.stage}: {did}" + (f"; {line}" if line else "")


def progress_key(stage: str) -> str:
    """The stage's progress artifact key: Prefect takes lowercase letters, digits and dashes only."""
    return f"{stage.replace('_', '-')}-progress"


def repro_with_progress(stage: str, overrides: dict[str, Any], artifact_at_start: bool = False) -> bool:
    """`dvc repro <stage>` with the run's overrides, its progress lines in the progress_key artifact (made at
    the first line, or at the start), then what_it_did; True if it ran, False if DVC found it up to date."""
    logger = get_run_logger()
    key = progress_key(stage)
    artifact = create_progress_artifact(0.0, key=key, description=f"{stage} stage") if artifact_at_start else None

    def progress(what: str, percent: float) -> None:
        nonlocal artifact
        if artifact is None:
            artifact = create_progress_artifact(percent, key=key, description=f"{stage} stage: {what}")
        else:
            update_progress_artifact(artifact, percent, description=f"{stage} stage: {what}")

    with overridden(overrides):
        result = repro(stage, logger.info, progress)
    if artifact is not None:
        update_progress_artifact(artifact, 100.0, description=f"{stage} stage")
    logger.info(what_it_did(result))
    return result.ran


@task(retries=1, retry_delay_seconds=10, task_run_name="{stage}")
def run_stage(stage: str, overrides: dict[str, Any]) -> bool:
    """`dvc repro <stage>` with the run's overrides; True if it ran, False if DVC found it up to date."""
    return repro_with_progress(stage, overrides)


@task(retries=2, retry_delay_seconds=5)
def train(overrides: dict[str, Any]) -> bool:
    """`dvc repro train`, its optimizer steps in a progress artifact; a retry resumes from the last checkpoint."""
    return repro_with_progress("train", overrides, artifact_at_start=True)


@task(retries=2, retry_delay_seconds=5)
def finetune(overrides: dict[str, Any]) -> bool:
    """`dvc repro finetune`, its optimizer steps in a progress artifact; a retry resumes from the last checkpoint."""
    return repro_with_progress("finetune", overrides, artifact_at_start=True)
