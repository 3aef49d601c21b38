"""LoRA through Hugging Face peft on quill's own GPT, and the merge back into plain weights.

model/ knows nothing of peft: `wrap` replaces the target projections (model/transformer.py's q_proj, ..., the
Hugging Face names too) with peft's LoRA layers from outside, freezing everything else but, with
`finetune.lora.train_markers`, the embedding and output rows of the ChatML markers (peft's trainable tokens, whose
rows replace the base's: a base that never saw the markers learns to end its turn). The adapter is saved alone
(`save_adapter`: peft's adapter_config.json + adapter_model.safetensors, keys as on Hugging Face's
LlamaForCausalLM, so `PeftModel.from_pretrained(llama, folder)` loads it too), and `merge` folds it into the base
weights, giving back a plain model.GPT for model.save_pretrained: every consumer loads an ordinary folder.

    >>> peft_model = wrap(gpt, LoraParams(rank=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"]), [5, 6])
    >>> merged = merge(peft_model)   # a model.GPT again, W + (alpha / rank) * B @ A in each target
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import TrainableTokensWrapper, _set_trainable

from model import GPT
from pipelines.common.atomic import atomic_dir
from pipelines.common.params import LoraParams

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def wrap(model: GPT, lora: LoraParams, marker_ids: Sequence[int] = ()) -> PeftModel:
    """`model` with LoRA adapters on `lora.targets` in every layer; only the adapters train, and the rows of
    `marker_ids` when `lora.train_markers` (B starts at zero and the rows at the base's, so the wrapped model
    computes exactly what `model` did)."""
    rows = sorted(set(marker_ids)) if lora.train_markers else []
    tied = model.config.tie_embeddings
    layers = ("embed_tokens",) if tied else ("embed_tokens", "lm_head")
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        trainable_token_indices={layer: rows for layer in layers} if rows else None,
    )
    wrapped = get_peft_model(model, config)
    if rows and tied:
        # peft ties the output head to the embedding's trainable rows only for transformers models (it reads
        # config.tie_word_embeddings); quill's GPT shares the tensor itself, so the head gets the same rows here
        embedding = wrapped.base_model.model.model.embed_tokens
        _set_trainable(
            wrapped.base_model.model,
            "default",
            inference_mode=False,
            module_names=["lm_head"],
            strict_module_check=True,
            wrapper_cls=TrainableTokensWrapper,
            token_indices=rows,
            tied_adapter=embedding.token_adapter,
        )
    return wrapped


def merge(model: PeftModel) -> GPT:
    """The adapters folded into the base weights (in place) and peft's layers removed: a plain model.GPT."""
    return model.merge_and_unload()


def save_adapter(model: PeftModel, out_dir: Path, base: str) -> Path:
    """peft's adapter files (and the model card peft writes) in `out_dir`, written whole or not at all; `base`
    (finetune.base) is recorded as the adapter's base_model_name_or_path."""
    model.peft_config["default"].base_model_name_or_path = base
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), save_embedding_layers=False)  # no embeddings are adapted: no hub lookup
    return out_dir


def note_no_adapter(out_dir: Path, chat_model: Path) -> Path:
    """For full fine-tuning: a README in place of adapter files (the DVC output always exists; its one file says
    why it holds no adapter)."""
    with atomic_dir(out_dir) as tmp:
        (tmp / "README.md").write_text(
            "# No adapter\n\nThis model was fine-tuned with `finetune.method: full`: every weight changed, so there is"
            f" no LoRA adapter.\nThe fine-tuned weights are in `{chat_model}`.\n",
            encoding="utf-8",
        )
    return out_dir
