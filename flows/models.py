"""The small flows around the registry: evaluate any registered version, move `champion`, serve a model.

    evaluate_model(model="champion")   the evaluate stage on the current data for a version or alias
    promote_model(version="3")         `champion` -> that version (under the register stage's lock), then redeploy
    serve_model(model=None)            deploy the champion (or a registry URI / local folder) and smoke-test it

Each is a deployment of `python -m flows.deploy`; none re-implements a stage: evaluate_model runs the evaluate
stage's own command on the downloaded version (`--model`), writing its outputs to a scratch folder (`--out`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.overrides import check
from flows.registry import move_champion, resolve
from flows.serving import endpoint, serve_cli
from flows.train_and_deploy import deploy_champion, smoke
from pipelines.common.contracts import HF_MODEL_PATH
from pipelines.common.layout import PROJECT
from pipelines.common.tracking import RUN_FILE


@task(retries=1, retry_delay_seconds=10)
def evaluate_version(model: str) -> dict[str, Any]:
    """Run the evaluate stage on the current data for a registered version; its metrics and MLflow run."""
    import mlflow  # heavy: only this task downloads models

    params = check({})
    name = params.registry.model_name
    version = resolve(name, model)
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="quill-evaluate-") as tmp:
        scratch = Path(tmp)
        local = Path(
            mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(scratch / "dl"))
        )
        folder = local / HF_MODEL_PATH
        (folder / RUN_FILE).unlink(missing_ok=True)  # log to a new run, not the training one
        out = scratch / "out"  # the stage's reports and metrics: the workspace's, which DVC tracks, stay as they are
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.evaluate", "--model", str(folder), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        for line in (result.stdout + result.stderr).splitlines()[-40:]:
            logger.info(line)
        if result.returncode != 0:
            raise RuntimeError(f"evaluate of {name} v{version.version} failed: {result.stderr[-1500:]}")
        metrics = json.loads(PROJECT.under(out).eval_metrics.read_text())
    return {"name": name, "version": str(version.version), "metrics": metrics}


@flow(name="evaluate_model", log_prints=True)
def evaluate_model(
    model: str = Field(default="champion", description="a version number or an alias (champion, challenger)"),
) -> dict[str, Any]:
    """Evaluate a registered version on the current test split; a Markdown table of its headline metrics."""
    result = evaluate_version(model)
    rows = [f"| {k} | {v:.4f} |" for k, v in result["metrics"].items() if isinstance(v, float)]
    create_markdown_artifact(
        f"# {result['name']} v{result['version']} on the current data\n\n| metric | value |\n|---|---|\n"
        + "\n".join(rows),
        key="evaluate-model",
    )
    return result


@flow(name="promote_model", log_prints=True)
def promote_model(
    version: str = Field(description="the version number (or an alias) to make champion"), redeploy: bool = True
) -> dict[str, Any]:
    """Move `champion` to a registered version, then redeploy it and smoke-test the endpoint."""
    before = move_champion(version, "promote_model")
    served = None
    if redeploy:
        params = check({})
        url = deploy_champion({}, params.serve, params.registry.model_name)
        served = smoke(url) if url else None
    return {"champion_before": before, "served": served}


@task(retries=1, retry_delay_seconds=10)
def deploy_model(model: str) -> str:
    """`python -m pipelines.serve --model <model>` (rolling update); the endpoint."""
    result = serve_cli("--model", model)
    if result.returncode != 0:
        raise RuntimeError(f"python -m pipelines.serve failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return endpoint(check({}).serve)


def registry_uri(model: str, name: str) -> str:
    """The models:/ URI of a version of the configured registered model `name` that `model` names (a version
    number, an alias, or a models:/ URI of that model); ValueError for anything else. A run's parameters never
    make the server load a folder or another model: that is the command line's (python -m pipelines.serve)."""
    if model.startswith("models:/"):
        rest = model.removeprefix("models:/")
        if rest.split("/")[0].split("@")[0] == name:
            return model
    elif model.isdigit() or model.replace("-", "").replace("_", "").isalnum():
        return f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"
    raise ValueError(
        f"model {model[:80]!r}: a run serves versions of the registered model {name!r} only (a version number, an "
        f"alias or models:/{name}/<version>); serve a folder or another model with python -m pipelines.serve --model"
    )


@flow(name="serve_model", log_prints=True)
def serve_model(
    model: str | None = Field(
        default=None, description="a version number, an alias or models:/<registry.model_name>/...; empty: champion"
    ),
) -> str | None:
    """Deploy a version of the registered model on Ray Serve (the champion by default) and smoke-test it."""
    params = check({})
    name = params.registry.model_name
    url = deploy_model(registry_uri(model, name)) if model else deploy_champion({}, params.serve, name)
    return smoke(url) if url else None
