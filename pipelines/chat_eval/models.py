"""The two models chat_eval compares: the chat model (artifacts/chat_model) and the base it was fine-tuned from, both
read through the chat model's tokenizer (the base's own, with the ChatML template: same ids, same vocabulary).

    >>> chat = chat_engine(layout.chat_model)
    >>> spec, uri = base_spec(layout.chat_model, finetune_params.base)     # what the chat model was tuned from
    >>> base = base_engine(resolve_base(uri, layout, scratch, tracking_uri), chat)

Which base: the one the finetune stage recorded in the chat model's quill_run.json (the spec as given and, for a
registry base, the version it resolved to; the finetune run's quill.base* tags say the same), else `finetune.base`. A registry base is loaded at that recorded
version (models:/<name>/<version>), not through an alias that may have moved since.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model import Engine
from model.chat import NoChatTemplateError, chat_markers
from pipelines.common.base_model import REGISTRY, Base
from pipelines.common.errors import StageError
from pipelines.common.tracking import RUN_FILE


class ChatModelError(StageError):
    """The chat model or its base cannot be evaluated; the message says what to do."""


def check_chat_model(folder: Path) -> None:
    """A loadable Hugging Face folder whose tokenizer carries the ChatML chat template, or ChatModelError."""
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ChatModelError(f"no chat model in {folder}: run the finetune stage first (dvc repro finetune)")
    if not (folder / "tokenizer.json").is_file():
        raise ChatModelError(f"{folder} has no tokenizer.json: re-export the chat model (dvc repro finetune)")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if not config.get("chat_template"):
        raise ChatModelError(
            f"{folder} has no chat_template in tokenizer_config.json, so it is no chat model: fine-tune one "
            "(dvc repro finetune)"
        )
    try:
        chat_markers(Tokenizer.from_file(str(folder / "tokenizer.json")))
    except NoChatTemplateError as exc:
        raise ChatModelError(f"{folder}: {exc}; fine-tune a chat model (dvc repro finetune)") from None


def chat_engine(folder: Path) -> Engine:
    """The chat model in float32 on the CPU (as the evaluate stage loads the base model)."""
    try:
        return Engine.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:  # weights that do not fit the config, unreadable safetensors, ...
        raise ChatModelError(f"cannot load the chat model in {folder}: {exc}; run dvc repro finetune") from None


def base_spec(chat_model: Path, default: str) -> tuple[str, str]:
    """(the base as given, what to resolve): the finetune stage's record in quill_run.json, else `default`
    (finetune.base). A registry base resolves to the version the record names."""
    run_file = chat_model / RUN_FILE
    record = {}
    if run_file.is_file():
        record = json.loads(run_file.read_text(encoding="utf-8")).get("base") or {}
    spec = record.get("spec") or default
    if spec.startswith(REGISTRY) and record.get("model_name") and record.get("version"):
        return spec, f"{REGISTRY}{record['model_name']}/{record['version']}"
    return spec, spec


def base_engine(base: Base, chat: Engine) -> Engine:
    """The base's weights (float32) over the chat model's tokenizer and end-of-text id."""
    if base.config.vocab_size != chat.config.vocab_size:
        raise ChatModelError(
            f"the base {base.spec} has vocab_size {base.config.vocab_size} but the chat model "
            f"{chat.config.vocab_size}: the chat model was fine-tuned from another base; run dvc repro finetune"
        )
    return Engine(base.load(), chat.tokenizer, eos_token_id=chat.eos_token_id)
