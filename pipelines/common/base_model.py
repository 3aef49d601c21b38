"""The base model of `finetune.base`: found (a folder, or a registry version downloaded), checked, loaded. The
finetune stage fine-tunes it; chat_eval scores the chat model next to it.

    artifacts/model              the train stage's folder (the default, a DVC dependency)
    models:/quill-gpt@champion   a registered version (by alias, models:/name/3 by number, models:/name the newest)
    /models/SmolLM2-135M         any local Hugging Face folder of a Llama-layout model with safetensors weights

A config that quill's model cannot represent exactly (another architecture, biases, a rope scaling it lacks, ...)
is refused before any work, in one line naming the field. The base's own tokenizer encodes the chat data, so it
must hold the ChatML markers <|im_start|> and <|im_end|>.

    >>> base = resolve_base("artifacts/model", Layout(), scratch)
    >>> base.config.block_size, base.run_id, base.version
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model import GPT, GPTConfig, load_pretrained
from model.chat import NoChatTemplateError, chat_markers
from model.hf import config_from_hf
from pipelines.common.contracts import HF_MODEL_PATH, Tag
from pipelines.common.errors import StageError
from pipelines.common.hashing import sha256_file
from pipelines.common.layout import Layout
from pipelines.common.tracking import registered_version, training_run_id

REGISTRY = "models:/"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class BaseModelError(StageError):
    """finetune.base names no model quill can fine-tune; the message says which field or file, and why."""


@dataclass(frozen=True)
class Base:
    spec: str  # finetune.base as written
    folder: Path  # its Hugging Face folder (for a registry version: downloaded into the stage's scratch folder)
    config: GPTConfig
    tokenizer_sha256: str
    weights_sha256: str  # of the weight files, which name the base in the resume fingerprint
    run_id: str | None = None  # the MLflow run that trained it, when known
    model_name: str | None = None  # the registered model and version, when it came from (or is in) the registry
    version: str | None = None

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.folder / "tokenizer.json"))

    def load(self) -> GPT:
        """The weights in float32 (what training updates), on the CPU."""
        return load_pretrained(self.folder, dtype=torch.float32).train()


def _rope_type(rope: dict | None) -> str:
    rope = rope or {}
    return rope.get("rope_type", rope.get("type", "default"))


# (config.json field, is its value one quill's model represents?, what quill's model has instead)
CHECKS = (
    ("model_type", lambda v: v == "llama", "model_type 'llama' only (the Llama layout of model/transformer.py)"),
    ("architectures", lambda v: v in (None, ["LlamaForCausalLM"]), "LlamaForCausalLM only"),
    ("attention_bias", lambda v: not v, "no biases"),
    ("mlp_bias", lambda v: not v, "no biases"),
    ("hidden_act", lambda v: v in (None, "silu"), "SwiGLU with silu only"),
    ("rope_scaling", lambda v: _rope_type(v) == "default", "plain rotary positions (no rope scaling)"),
    ("rope_parameters", lambda v: _rope_type(v) == "default", "plain rotary positions (rope_type 'default')"),
    ("pretraining_tp", lambda v: v in (None, 1), "unsplit projections (pretraining_tp 1)"),
    ("sliding_window", lambda v: v is None, "full attention over the context"),
)


def check_config(cfg: dict, where: str) -> GPTConfig:
    """The GPTConfig of a config.json, or BaseModelError naming the first field quill's model cannot represent."""
    if "quill_config" in cfg:  # written by model.save_pretrained
        try:
            return GPTConfig.from_dict(cfg["quill_config"])
        except (TypeError, ValueError) as exc:
            raise BaseModelError(f"{where}: config.json field 'quill_config' is invalid ({exc})") from None
    for name, ok, supported in CHECKS:
        if name in cfg and not ok(cfg[name]):
            raise BaseModelError(
                f"{where}: config.json field '{name}' is {json.dumps(cfg[name])}, which quill's model cannot "
                f"represent ({supported}); choose another finetune.base"
            )
    try:
        return config_from_hf(cfg)
    except KeyError as exc:
        raise BaseModelError(f"{where}: config.json lacks the field {exc}; choose another finetune.base") from None
    except (TypeError, ValueError) as exc:
        raise BaseModelError(f"{where}: {exc}; choose another finetune.base") from None


def _from_registry(spec: str, scratch: Path, tracking_uri: str) -> tuple[Path, str, str, str | None]:
    """(folder, model name, version, training run id) of a models:/ URI, downloaded into `scratch`."""
    import mlflow  # lazily: mlflow takes seconds to import, and only this kind of base needs it
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = registered_version(client, spec)
    except ValueError as exc:
        raise BaseModelError(f"finetune.base {exc}") from None
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"{REGISTRY}{mv.name}/{mv.version}", dst_path=str(scratch))
    run_id = mv.tags.get(Tag.TRAINING_RUN) or mv.run_id
    return Path(local) / HF_MODEL_PATH, mv.name, str(mv.version), run_id


def _registered(layout: Layout, run_id: str | None) -> tuple[str | None, str | None]:
    """(model name, version) of the train stage's model when the register stage registered this very run."""
    if run_id is None or not layout.registered.is_file():
        return None, None
    record = json.loads(layout.registered.read_text(encoding="utf-8"))
    if record.get("run_id") != run_id:
        return None, None
    return record.get("model_name"), None if record.get("version") is None else str(record["version"])


def resolve_base(spec: str, layout: Layout, scratch: Path, tracking_uri: str) -> Base:
    """Find and check the base of `finetune.base` (nothing is loaded yet; `Base.load` does that)."""
    name = version = run_id = None
    if spec.startswith(REGISTRY):
        folder, name, version, run_id = _from_registry(spec, scratch, tracking_uri)
    else:
        folder = layout.model if Path(spec) == Layout().model else layout.root / spec
    where = f"finetune.base {spec}"
    if not (folder / "config.json").is_file():
        hint = "run dvc repro train first" if folder == layout.model else "give a Hugging Face model folder"
        raise BaseModelError(f"{where}: no config.json in {folder} ({hint})")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise BaseModelError(f"{where}: no model.safetensors in {folder} (only safetensors weights are loaded)")
    if not (folder / "tokenizer.json").is_file():
        raise BaseModelError(f"{where}: no tokenizer.json in {folder} (the chat data is encoded with the base's own)")
    config = check_config(json.loads((folder / "config.json").read_text(encoding="utf-8")), where)
    try:
        chat_markers(Tokenizer.from_file(str(folder / "tokenizer.json")))
    except NoChatTemplateError as exc:
        raise BaseModelError(f"{where}: {exc}; fine-tuning for chat needs them (ChatML)") from None
    if run_id is None:
        run_id = training_run_id(folder)
        name, version = _registered(layout, run_id)
    weights = "+".join(sha256_file(folder / w) for w in sorted(p.name for p in folder.glob("model*.safetensors")))
    return Base(spec, folder, config, sha256_file(folder / "tokenizer.json"), weights, run_id, name, version)
