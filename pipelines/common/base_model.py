"""The base model of `finetune.base`: found (a folder, or a registry version downloaded), checked, loaded. The
finetune stage fine-tunes it; chat_eval scores the chat model next to it.

    artifacts/model              the train stage's folder (the default, a DVC dependency)
    models:/quill-gpt@champion   a registered version (by alias, models:/name/3 by number, models:/name the newest)
    /models/SmolLM2-135M         any local Hugging Face folder of a Llama-layout model with safetensors weights

A config that quill's model cannot represent exactly (another architecture, biases, a rope scaling it lacks, ...)
is refused before any work, in one line naming the field. The base's own tokenizer encodes the chat data. A
tokenizer without the ChatML markers <|im_start|> and <|im_end|> (TinyLlama's, say) gets them added as special
tokens (its files, so extended, go to the scratch folder), and the model grows an embedding and output row for
each, starting as the mean of the others (`Base.load`): fine-tuning teaches them.

    >>> base = resolve_base("artifacts/model", Layout(), scratch)
    >>> base.config.block_size, base.run_id, base.version
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from model import GPT, GPTConfig, load_pretrained
from model.chat import IM_END, IM_START, NoChatTemplateError, chat_markers
from model.hf import TOKENIZER_FILES, config_from_hf
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
    config: GPTConfig  # with the rows of added markers counted in vocab_size
    tokenizer_sha256: str  # of the tokenizer.json the chat data is encoded with (the extended one, if extended)
    weights_sha256: str  # of the weight files, which name the base in the resume fingerprint
    run_id: str | None = None  # the MLflow run that trained it, when known
    model_name: str | None = None  # the registered model and version, when it came from (or is in) the registry
    version: str | None = None
    tokenizer_folder: Path | None = None  # the tokenizer's files when not the folder's own (markers added)
    added_markers: tuple[int, ...] = ()  # ids of the ChatML markers added to the base's tokenizer

    @property
    def tokenizer_files(self) -> Path:
        return self.tokenizer_folder or self.folder

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_files / "tokenizer.json"))

    def load(self) -> GPT:
        """The weights in float32 (what training updates), on the CPU, with rows for the added markers."""
        model = load_pretrained(self.folder, dtype=torch.float32)
        if self.added_markers:
            model.resize_token_embeddings(self.config.vocab_size, mean_rows=self.added_markers)
        return model.train()


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
    tokenizer_folder, added = None, ()
    try:
        chat_markers(Tokenizer.from_file(str(folder / "tokenizer.json")))
    except NoChatTemplateError:
        tokenizer_folder, added = with_chat_markers(folder, scratch / "base_tokenizer")
        config = replace(config, vocab_size=max(config.vocab_size, max(added) + 1))
    if run_id is None:
        run_id = training_run_id(folder)
        name, version = _registered(layout, run_id)
    weights = "+".join(sha256_file(folder / w) for w in sorted(p.name for p in folder.glob("model*.safetensors")))
    tokenizer_sha256 = sha256_file((tokenizer_folder or folder) / "tokenizer.json")
    return Base(spec, folder, config, tokenizer_sha256, weights, run_id, name, version, tokenizer_folder, added)


def with_chat_markers(folder: Path, out_dir: Path) -> tuple[Path, tuple[int, ...]]:
    """`folder`'s tokenizer files in `out_dir` with the ChatML markers it lacks added as special tokens; (out_dir,
    the added markers' ids). transformers reads the extended tokenizer.json as it is (its added tokens)."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    missing = [m for m in (IM_START, IM_END) if tokenizer.token_to_id(m) is None]
    tokenizer.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name != "tokenizer.json" and (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    decoder = config.setdefault("added_tokens_decoder", {})
    for marker in missing:
        flags = dict.fromkeys(("lstrip", "normalized", "rstrip", "single_word"), False)
        decoder[str(tokenizer.token_to_id(marker))] = {"content": marker, **flags, "special": True}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir, tuple(tokenizer.token_to_id(m) for m in missing)
