"""pipelines/finetune/lora.py: peft's adapters on quill's GPT, merged into plain weights."""

from __future__ import annotations

import json

import pytest
import torch

from model import GPT, GPTConfig
from pipelines.common.params import LoraParams
from pipelines.finetune import lora


@pytest.mark.parametrize("tie", [True, False])
def test_the_merged_model_gives_the_adapter_models_logits(tmp_path, tie):
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset("tiny", vocab_size=300, tie_embeddings=tie))
    markers = [1, 2]  # <|im_start|>, <|im_end|>: their embedding and output rows train beside the adapters
    params = LoraParams(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    wrapped = lora.wrap(base, params, markers)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert sum("trainable_tokens" in n for n in trainable) == (1 if tie else 2)  # a tied head shares the rows
    for name, p in wrapped.named_parameters():
        if "lora_B" in name or "trainable_tokens" in name:
            torch.nn.init.normal_(p, std=0.2)  # B and the rows start as the base's: make the adapter do something
    x = torch.randint(0, 300, (2, 24))
    x[:, ::5] = 2
    wrapped.eval()
    with torch.enable_grad():  # peft's layers run on the training path (lit_chat.py)
        adapted = wrapped(x)[0].detach()
    lora.save_adapter(wrapped, tmp_path / "adapter", "artifacts/model")
    merged = lora.merge(wrapped)
    assert type(merged) is GPT and not any("lora" in n or "token_adapter" in n for n in merged.state_dict())
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=0)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= set(lora.ADAPTER_FILES)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "artifacts/model"


def test_without_train_markers_only_the_adapters_train():
    base = GPT(GPTConfig.from_preset("tiny", vocab_size=300))
    params = LoraParams(rank=4, alpha=8, targets=["q_proj"], train_markers=False)
    wrapped = lora.wrap(base, params, [1, 2])
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)
