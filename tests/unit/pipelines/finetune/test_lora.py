"""pipelines/finetune/lora.py: peft's adapters on quill's GPT, merged into plain weights."""

from __future__ import annotations

import json

import torch

from model import GPT, GPTConfig
from pipelines.common.params import LoraParams
from pipelines.finetune import lora


def test_the_merged_model_gives_the_adapter_models_logits(tmp_path):
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset("tiny", vocab_size=300))
    wrapped = lora.wrap(base, LoraParams(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B starts at zero: make the adapter do something
    x = torch.randint(0, 300, (2, 24))
    wrapped.eval()
    with torch.enable_grad():  # peft's layers run on the training path (lit_chat.py)
        adapted = wrapped(x)[0].detach()
    lora.save_adapter(wrapped, tmp_path / "adapter", "artifacts/model")
    merged = lora.merge(wrapped)
    assert type(merged) is GPT and not any("lora" in n for n in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=0)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= set(lora.ADAPTER_FILES)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "artifacts/model"
