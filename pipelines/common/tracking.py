"""MLflow setup shared by the train, evaluate and register stages.

The store is `MLFLOW_TRACKING_URI` (the only setting); unset, it is the project's SQLite file
`sqlite:///mlflow.db` with artifacts under `mlartifacts/` beside it. A run's lineage comes from
`git_commit()` and `input_hashes()` (DVC's own hashes from dvc.lock when the stage ran through DVC,
else a content hash computed here).

    >>> client = mlflow_client()
    >>> experiment_id = get_or_create_experiment(client, "quill")
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipelines.common.errors import StageError
from pipelines.common.hashing import content_hash

if TYPE_CHECKING:  # mlflow takes seconds to import; stages import it only when they log
    from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_FILE = "quill_run.json"  # the train stage's MLflow run id and store, written into the model folder
EXPERIMENT = "quill"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def default_tracking_uri(cwd: Path | None = None) -> str:
    """The project's SQLite store, also from a queued DVC experiment.

    `dvc exp run --queue` runs stages in a temporary copy, <project>/.dvc/tmp/exps/<tmp>/, that DVC
    deletes afterwards; a relative sqlite:///mlflow.db would put the experiment's runs there and lose
    them. From such a copy the store is the project's own mlflow.db (an absolute path).
    """
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return f"sqlite:///{Path(*parts[:i]) / 'mlflow.db'}"
    return DEFAULT_TRACKING_URI


def mlflow_client(uri: str | None = None) -> MlflowClient:
    from mlflow import MlflowClient  # lazily: mlflow takes seconds to import (see above)

    return MlflowClient(tracking_uri=uri or tracking_uri())


def version_by_alias(client: MlflowClient, name: str, alias: str):
    """The ModelVersion that `alias` (e.g. CHAMPION) points at in registered model `name`, or None when the model
    or the alias does not exist."""
    from mlflow.exceptions import MlflowException  # lazily, as above

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def registered_version(client: MlflowClient, uri: str):
    """The ModelVersion a models:/ URI names: models:/<name>@<alias>, models:/<name>/<version>, or models:/<name>
    (its newest version); ValueError saying what was not found."""
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            return client.get_model_version_by_alias(*ref.split("@", 1))
        if "/" in ref:
            return client.get_model_version(*ref.split("/", 1))
        return max(client.search_model_versions(f"name='{ref}'"), key=lambda v: int(v.version))
    except Exception as exc:  # MlflowException, or no version at all (max of nothing)
        raise ValueError(f"{uri}: not found in the registry at {client.tracking_uri} ({exc})") from None


def continue_run(client: MlflowClient, run_id: str | None) -> str | None:
    """`run_id` marked running again when the store still has it (a resumed stage logs on into its run), else
    None with a warning: the caller creates a new run."""
    from mlflow.exceptions import MlflowException  # lazily, as above

    if run_id is None:
        return None
    try:
        client.get_run(run_id)
    except MlflowException:
        warnings.warn(
            f"MLflow run {run_id} from the checkpoint is not in {client.tracking_uri}; logging to a new run",
            stacklevel=3,
        )
        return None
    client.update_run(run_id, status="RUNNING")
    return run_id


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a SQLite store; the server's choice otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str = EXPERIMENT) -> str:
    """The id of experiment `name`, created on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException  # lazily, as mlflow_client()

    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    except MlflowException:  # created meanwhile by a concurrent stage
        return client.get_experiment_by_name(name).experiment_id


def git_commit(repo: str | Path = ".") -> str | None:
    """HEAD's commit, with '-dirty' if tracked files have uncommitted changes; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def input_hashes(paths: list[str], lock_file: str | Path = "dvc.lock", root: Path = Path(".")) -> dict[str, str]:
    """{path: hash} for each input (paths relative to the project `root`, as dvc.lock names them): DVC's md5
    from dvc.lock when it lists the path, else `content_hash`.

    dvc.lock describes what the last `dvc repro` produced; it is trusted only when the folder on disk
    still matches it in size and file count (cheap), otherwise the folder is hashed here.
    """
    recorded: dict[str, dict] = {}
    lock_file = Path(lock_file)
    if lock_file.is_file():
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
        for stage in (lock.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                recorded[str(out.get("path", "")).rstrip("/")] = out
    hashes = {}
    for p in paths:
        entry = recorded.get(p.rstrip("/"))
        if entry and entry.get("md5") and _matches(root / p, entry):
            hashes[p] = "md5:" + entry["md5"]
        elif (root / p).exists():
            hashes[p] = content_hash(root / p)
    return hashes


def _matches(path: Path, entry: dict) -> bool:
    if not path.exists():
        return False
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    if entry.get("size") is not None and entry["size"] != size:
        return False
    return entry.get("nfiles") is None or path.is_file() or entry["nfiles"] == len(files)


class TrackingError(StageError):
    """The MLflow tracking server does not answer."""


def check_tracking() -> str:
    """The tracking URI, after checking that an HTTP server answers (a SQLite store needs no check)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); start "
                "it or unset MLFLOW_TRACKING_URI to use the local store"
            ) from None
    return uri


def training_run_id(model_dir: Path) -> str | None:
    """The MLflow run the train stage recorded in the model folder (None if it recorded none)."""
    f = model_dir / RUN_FILE
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("mlflow_run_id")


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested numeric metrics as {"a.b.c": value}, the names `dvc metrics show` prints."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def evaluation_run(client: MlflowClient, run_id: str | None, stage: str, log) -> str:
    """The run an evaluation logs into: `run_id` (the model's training or fine-tuning run) when the store has it,
    else a new finished run named for `stage`, said through `log`."""
    from mlflow.exceptions import MlflowException  # lazily, as above

    if run_id is not None:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException:
            log(f"run {run_id} is not in {client.tracking_uri}; logging to a new run")
    created = client.create_run(get_or_create_experiment(client), run_name=stage, tags={"quill.stage": stage})
    client.set_terminated(created.info.run_id)
    return created.info.run_id


def log_metric_tree(client: MlflowClient, run_id: str, prefix: str, metrics: dict) -> None:
    """Every number of `metrics` (nested) as `<prefix>.<a.b.c>`, in batches the store takes (500 at most)."""
    import time

    from mlflow.entities import Metric  # lazily, as above

    now = int(time.time() * 1000)
    values = [Metric(f"{prefix}.{k}", v, now, 0) for k, v in sorted(flat_metrics(metrics).items())]
    for i in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[i : i + 500], synchronous=True)
