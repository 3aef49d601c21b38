"""Hugging Face folder I/O: config.json (LlamaForCausalLM), model.safetensors, generation_config.json
and the tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads our models
with no custom code.

The folder records the sha256 of its tokenizer.json under `quill_tokenizer_sha256`; loading refuses a
folder whose tokenizer does not match. Weights are read only from safetensors (nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import GPTConfig
from model.transformer import GPT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHA_KEY = "quill_tokenizer_sha256"


class TokenizerMismatchError(ValueError):
    """The tokenizer beside the weights is not the one the model was trained with."""


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32, bos_token_id=None, eos_token_id=None) -> dict:
    """Our config as a LlamaConfig dict."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "hidden_size": config.n_embd,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout,
        "initializer_range": config.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "use_cache": True,
    }


def config_from_hf(d: dict) -> GPTConfig:
    """A LlamaConfig dict (ours or one written by transformers) as a GPTConfig."""
    if d.get("model_type") != "llama":
        raise ValueError(f"config.json: model_type must be 'llama', got {d.get('model_type')!r}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: unsupported rope type {rope.get('rope_type')!r} (only 'default')")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("config.json: attention_bias/mlp_bias are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act must be 'silu', got {d.get('hidden_act')!r}")
    n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
    if d.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"config.json: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    return GPTConfig(
        vocab_size=d["vocab_size"],
        block_size=d["max_position_embeddings"],
        n_layer=d["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        intermediate_size=d["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=d.get("tie_word_embeddings", False),
        dropout=0.0,
        init_std=d.get("initializer_range", 0.02),
    )


def _special_token_ids(tokenizer_dir: Path) -> tuple[int | None, int | None]:
    """bos/eos ids named in tokenizer_config.json / special_tokens_map.json, looked up in tokenizer.json."""
    names: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = tokenizer_dir / fname
        if f.exists():
            for key in ("bos_token", "eos_token"):
                tok = json.loads(f.read_text()).get(key)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if isinstance(tok, str):
                    names.setdefault(key, tok)
    tj = tokenizer_dir / "tokenizer.json"
    if not tj.exists():
        return None, None
    spec = json.loads(tj.read_text())
    vocab = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    model_vocab = spec.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab = {**model_vocab, **vocab}
    return vocab.get(names.get("bos_token")), vocab.get(names.get("eos_token"))


def save_pretrained(model: GPT, out_dir, tokenizer_dir=None, generation_config: dict | None = None) -> Path:
    """Write `model` (and the tokenizer files from `tokenizer_dir`) as a Hugging Face folder.

    Written into a temporary sibling folder and renamed into place, so readers never see half a
    folder. Returns the folder's path.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the model folder is read by servers and other users
    try:
        bos = eos = sha = None
        if tokenizer_dir is not None:
            tokenizer_dir = Path(tokenizer_dir)
            if not (tokenizer_dir / "tokenizer.json").exists():
                raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
            for fname in TOKENIZER_FILES:
                if (tokenizer_dir / fname).exists():
                    shutil.copyfile(tokenizer_dir / fname, tmp / fname)
            if not (tmp / "tokenizer_config.json").exists():
                # without it AutoTokenizer would guess a Llama (sentencepiece) tokenizer class
                (tmp / "tokenizer_config.json").write_text(
                    json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
                )
            sha = file_sha256(tmp / "tokenizer.json")
            bos, eos = _special_token_ids(tmp)

        state = model.state_dict()
        dtype = model.lm_head.weight.dtype
        if model.config.tie_embeddings:
            state.pop("lm_head.weight")  # HF re-ties it from tie_word_embeddings
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})

        cfg = hf_config(model.config, dtype, bos_token_id=bos, eos_token_id=eos)
        cfg["quill_config"] = model.config.to_dict()
        if sha is not None:
            cfg[SHA_KEY] = sha
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": eos, **(generation_config or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

        if out_dir.exists():  # swap: old folder aside, new one in, old one removed
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def check_tokenizer(path, expected_tokenizer_sha256: str | None = None) -> str | None:
    """The folder's recorded tokenizer sha256, after checking it against the tokenizer.json beside it
    and against `expected_tokenizer_sha256`. Raises TokenizerMismatchError on any disagreement."""
    path = Path(path)
    recorded = json.loads((path / "config.json").read_text()).get(SHA_KEY)
    tj = path / "tokenizer.json"
    if recorded is not None and tj.exists():
        actual = file_sha256(tj)
        if actual != recorded:
            raise TokenizerMismatchError(
                f"{tj} has sha256 {actual}, but the model in {path} was saved with tokenizer {recorded}"
            )
    if expected_tokenizer_sha256 is not None:
        found = recorded if recorded is not None else (file_sha256(tj) if tj.exists() else None)
        if found != expected_tokenizer_sha256:
            raise TokenizerMismatchError(
                f"model in {path} was trained with tokenizer {found}, expected {expected_tokenizer_sha256}"
            )
    return recorded


def _shard(folder: Path, name: str) -> Path:
    """A weight file the index names: a file of the model folder itself, never a path out of it."""
    shard = folder / name
    if Path(name).name != name or not shard.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"model.safetensors.index.json names {name[:80]!r}: shards must be files of {folder}")
    return shard


def load_pretrained(
    path, expected_tokenizer_sha256: str | None = None, map_location="cpu", dtype: torch.dtype | None = None
) -> GPT:
    """Build a GPT from a Hugging Face Llama folder (ours or one written by transformers); dtype: the weights'
    dtype in memory (None: as saved)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    check_tokenizer(path, expected_tokenizer_sha256)
    cfg = json.loads((path / "config.json").read_text())
    config = GPTConfig.from_dict(cfg["quill_config"]) if "quill_config" in cfg else config_from_hf(cfg)

    if (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [_shard(path, f) for f in sorted(set(index["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"no model.safetensors in {path} (only safetensors weights are loaded)")
    state = {}
    for f in files:
        state.update(load_file(f, device=str(map_location)))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    elif not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")

    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=map_location).to(dtype)
    model._rope_init()  # buffers are not in the file
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.load_state_dict(state, strict=False, assign=False)
    return model.eval()
