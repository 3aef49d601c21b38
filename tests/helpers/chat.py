"""Tiny chat fine-tuning inputs: conversations in data/chat, a third-party Llama-layout folder, tiny knobs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from tests.helpers.corpus import WORDS
from tests.helpers.tokenizers import byte_bpe

# A few seconds of fine-tuning on a tiny base: two validations and several checkpoints.
TINY_FINETUNE = dict(
    method="lora",  # the tests of the adapters; those of full fine-tuning say method="full"
    max_steps=12,
    batch_size=4,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=2,
    val_every=6,
    val_batches=2,
    log_every=2,
    checkpoint_every=4,
    seed=7,
)
# one conversation with a system message and two exchanges (masking, templates)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is there?"},
    {"role": "assistant", "content": "Nay, answer me."},
    {"role": "user", "content": "Long live the king!"},
    {"role": "assistant", "content": "Bernardo?"},
]
SOURCES = [{"type": "jsonl", "path": "chats"}]  # what chat_data would read; the tests write data/chat directly


def conversation(rng: random.Random, turns: int, system: bool = False) -> list[dict]:
    def say() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))).capitalize() + "."

    messages = [{"role": "system", "content": "You answer briefly."}] if system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
    return messages


def write_chats(chat_dir: Path, seed: int = 0, n_train: int = 48, n_val: int = 8) -> Path:
    """data/chat/{train,val,test}.jsonl as the chat_data stage writes them: 1-4 exchanges, a system prompt in some."""
    rng = random.Random(seed)
    chat_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", 4)):
        with open(chat_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                messages = conversation(rng, rng.randint(1, 4), system=i % 4 == 0)
                f.write(json.dumps({"id": f"{split}{i}", "source": "test", "messages": messages}) + "\n")
    return chat_dir


def write_params(root: Path, **finetune) -> Path:
    """A params.yaml for a tiny project with a finetune section (TINY_FINETUNE, then `finetune`)."""
    params = {
        "data": {"sources": [{"type": "local", "path": "corpus"}]},
        "model": {"preset": "tiny"},
        "finetune": {"sources": SOURCES, **TINY_FINETUNE, **finetune},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def llama_folder(out: Path, seed: int = 0, markers: bool = True, **config) -> Path:
    """A tiny third-party Llama model as `transformers` writes it (safetensors), with a byte-level BPE tokenizer
    holding the ChatML markers, whose pad token is <|im_end|> (as SmolLM2's is): fine-tuning must not pad with it.
    Without `markers`, a tokenizer that has none (as TinyLlama's), padding with its end-of-text token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if markers:
        tokenizer = byte_bpe([" ".join(WORDS)] * 4, vocab_size=320)
        specials = dict(bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    else:
        tokenizer = byte_bpe([" ".join(WORDS)] * 4, vocab_size=320, specials=("<s>", "</s>"))
        specials = dict(bos_token="<s>", eos_token="</s>")
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
    hf_tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **{"max_position_embeddings": 64, "tie_word_embeddings": False, **config},
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def fine_tuned_llama(root: Path, **config) -> Path:
    """The finetune stage's chat model (two steps of LoRA) of a tiny third-party Llama folder whose tokenizer has
    no ChatML markers (as TinyLlama's): root/artifacts/chat_model, a plain folder the server loads."""
    from pipelines.common.layout import Layout
    from pipelines.common.params import load_params
    from pipelines.finetune.stage import finetune

    base = llama_folder(root / "base", markers=False, **config)
    write_chats(root / "data/chat")
    write_params(root, base=str(base), max_steps=2, val_every=2, checkpoint_every=2)
    layout = Layout().under(root)
    finetune(load_params(root / "params.yaml"), layout, tracking_uri=f"sqlite:///{root}/mlflow.db")
    return layout.chat_model
