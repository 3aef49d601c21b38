"""The chat model's stages in a flow: chat_data -> finetune -> chat_eval -> chat_register, each a
`dvc repro <stage>` task like the base model's. train_and_deploy runs them after register, finetune_and_deploy
alone (DVC brings whatever they depend on up to date first).
"""

from __future__ import annotations

import json
from typing import Any

from flows.tasks import finetune, run_stage
from pipelines.common.layout import PROJECT

CHAT_STAGES = ("chat_data", "finetune", "chat_eval", "chat_register")


def chat_stages(overrides: dict[str, Any]) -> dict[str, bool]:
    """Run the chat model's stages in order; {stage: whether DVC ran it}. A stage that fails stops the rest."""
    return {stage: finetune(overrides) if stage == "finetune" else run_stage(stage, overrides) for stage in CHAT_STAGES}


def chat_registered() -> dict[str, Any] | None:
    """artifacts/chat_registered.json: the chat model's version and its promotion decision, once registered."""
    return json.loads(PROJECT.chat_registered.read_text()) if PROJECT.chat_registered.is_file() else None
