"""The chat model's folders: a plain Hugging Face folder with the base's tokenizer and a ChatML chat template, and
the LoRA adapter on its own.

    artifacts/chat_model/     model.save_pretrained of the fine-tuned weights (LoRA merged in): config.json,
                              model.safetensors, generation_config.json, the base's tokenizer files with
                              `chat_template` set in tokenizer_config.json, quill_run.json (MLflow run, base)
    artifacts/chat_adapter/   method lora: peft's adapter_config.json + adapter_model.safetensors (+ its README);
                              method full: a README.md saying why there is no adapter

The chat template is always ChatML, whatever the base's tokenizer carried: it is what the model was fine-tuned on
(model/chat.py's encode_chat), so `AutoTokenizer.apply_chat_template` gives the ids training saw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model import GPT, save_pretrained
from model.hf import TOKENIZER_FILES

# model/chat.py's encode_chat rendered as Jinja (the same string the tokenize stage stores for quill's tokenizer)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(base_folder: Path, out_dir: Path) -> Path:
    """The base's tokenizer files in `out_dir`, with the ChatML chat template in tokenizer_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (base_folder / name).is_file():
            shutil.copyfile(base_folder / name, out_dir / name)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config["chat_template"] = CHATML_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def save_chat_model(model: GPT, out_dir: Path, base_folder: Path, scratch: Path) -> Path:
    """The fine-tuned weights as a Hugging Face folder (written whole or not at all) with the chat tokenizer."""
    tokenizer_dir = chat_tokenizer(base_folder, scratch / "chat_tokenizer")
    return save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir)
