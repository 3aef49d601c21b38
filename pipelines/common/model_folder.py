"""The model folder contract (artifacts/model, a registered version's hf_model): checked before any long work."""

from __future__ import annotations

import json
from pathlib import Path

from model.hf import config_from_hf
from pipelines.common.errors import StageError


class ModelFolderError(StageError):
    """The folder does not hold a model quill can load; the message says how to get one."""


def check_model_dir(model_dir: Path) -> dict:
    """The folder's config.json, after checking that the folder holds a model quill can load."""
    if not (model_dir / "config.json").is_file():
        raise ModelFolderError(
            f"no model in {model_dir} (config.json missing): run the train stage first (dvc repro train)"
        )
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        raise ModelFolderError(f"{model_dir} has no model.safetensors: re-export the model (dvc repro train)")
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelFolderError(
            f"{model_dir} has no tokenizer.json: re-export the model with its tokenizer (dvc repro train)"
        )
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        if "quill_config" not in cfg:
            config_from_hf(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(
            f"{model_dir}/config.json is not a model quill can load ({exc}); "
            "point eval at a quill or Llama-layout folder"
        ) from None
    return cfg
