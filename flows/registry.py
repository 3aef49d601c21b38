"""Moving `champion` by hand (a reviewer's approval, the promote_model flow), under the register stage's lock."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.runtime import flow_run

from flows.overrides import check
from pipelines.common.contracts import CHALLENGER, CHAMPION
from pipelines.common.registration.lock import RegistrationLock
from pipelines.common.tracking import mlflow_client, version_by_alias


def resolve(name: str, model: str) -> Any:
    """The ModelVersion that `model` (a version number or an alias) names in registered model `name`."""
    client = mlflow_client()
    return client.get_model_version(name, model) if model.isdigit() else client.get_model_version_by_alias(name, model)


@task(retries=1, retry_delay_seconds=5)
def move_champion(version: str, why: str) -> str:
    """Point `champion` at `version` (under the register stage's lock, its owner checked before each write) and
    drop `challenger` if it named that version; the version `champion` named before ("none" if none)."""
    params = check({}).registry
    name = params.model_name
    client = mlflow_client()
    with RegistrationLock(client, name, params.lock_timeout_s) as lock:
        champion = version_by_alias(client, name, CHAMPION)
        before = str(champion.version) if champion else "none"
        target = resolve(name, version)
        lock.ensure()
        client.set_registered_model_alias(name, CHAMPION, target.version)
        if CHALLENGER in (target.aliases or []):
            lock.ensure()
            client.delete_registered_model_alias(name, CHALLENGER)
        client.set_model_version_tag(
            name,
            target.version,
            "quill.promoted_by",
            f"{why} flow run {flow_run.name} ({flow_run.id}), replacing v{before}",
        )
    return before
