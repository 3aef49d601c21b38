"""Which model to serve: a registry URI pinned to its version, or a local Hugging Face folder.

    >>> src = resolve("models:/quill-gpt@champion", tracking_uri())   # alias -> models:/quill-gpt/3
    >>> src.uri, src.name, src.version
    >>> folder = fetch(src, tracking_uri())                             # on the replica: the HF folder

Aliases are pinned at deploy time, so deploying `@champion` again after a promotion changes the deployment's
arguments and Ray Serve rolls the replicas over to the new version (the same URI twice would change nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipelines.common.contracts import HF_MODEL_PATH, Tag
from pipelines.common.tracking import registered_version


@dataclass(frozen=True)
class ModelSource:
    uri: str  # models:/<name>/<version>, or an absolute local folder
    name: str  # served model name (/v1/models, the `model` field)
    version: str  # registry version, or "local"
    tokenizer_sha256: str | None = None  # expected hash of tokenizer.json (registry tag), checked on load


def resolve(model: str, tracking_uri: str) -> ModelSource:
    """Pin a registry URI (models:/name@alias, models:/name/version, models:/name) or check a local folder."""
    if not model.startswith("models:/"):
        folder = Path(model).resolve()
        if not (folder / "config.json").is_file():
            raise ValueError(f"{model}: not a model folder (no config.json) and not a models:/ URI")
        return ModelSource(str(folder), folder.name, "local")
    mv = registered_version(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), model)
    sha = mv.tags.get(Tag.TOKENIZER)
    return ModelSource(f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version), sha if sha != "None" else None)


def fetch(src: ModelSource, tracking_uri: str) -> Path:
    """The Hugging Face folder of a source (downloaded from the registry if need be)."""
    if not src.uri.startswith("models:/"):
        return Path(src.uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(src.uri)) / HF_MODEL_PATH
