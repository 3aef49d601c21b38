"""Hugging Face folder I/O (model/hf.py): transformers loads our folders unchanged, with the same logits and
generations; our loader reads them back (and folders written by transformers); tokenizers are pinned."""

import json
import os
import stat

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from model import Engine, SamplingParams, load_pretrained, save_pretrained
from model.hf import SHA_KEY, TokenizerMismatchError, file_sha256
from tests.helpers.generation import EOT
from tests.helpers.models import make_model


@pytest.mark.parametrize("tie, n_kv_head", [(True, 4), (False, 4), (True, 2), (False, 1)])
def test_transformers_loads_our_folder_with_identical_outputs(tmp_path, tokenizer_dir, tie, n_kv_head):
    m = make_model(tie, n_kv_head)
    out = save_pretrained(m, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie

    torch.manual_seed(1)
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, m(idx)[0], atol=1e-4, rtol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not 🙂 中文"
    assert hf_tok(text)["input_ids"] == Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    assert hf_tok.eos_token_id == hf.config.eos_token_id == 0

    # identical greedy generations, batched with left padding
    engine = Engine(m, out / "tokenizer.json")
    prompts = ["To be, or not", "🙂"]
    ours = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    hf_tok.padding_side = "left"
    hf_tok.pad_token = EOT
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = hf.generate(
            **enc, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=12
        )
    for r, c in enumerate(ours):
        assert gen[r, enc["input_ids"].shape[1] :].tolist() == c.token_ids


def test_round_trip(tmp_path, tokenizer_dir):
    m = make_model(tie=False, n_kv_head=2)
    out = save_pretrained(m, tmp_path / "m", tokenizer_dir=tokenizer_dir, generation_config={"temperature": 0.8})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700: servers read it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float32" and cfg["eos_token_id"] == 0 and cfg["bos_token_id"] == 0
    assert cfg[SHA_KEY] == file_sha256(tokenizer_dir / "tokenizer.json")
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.8

    loaded = load_pretrained(out)
    assert loaded.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    idx = torch.randint(0, 300, (1, 30))
    assert torch.equal(loaded(idx)[0], m(idx)[0])


def test_tied_round_trip_keeps_weights_tied(tmp_path):
    m = make_model(tie=True)
    loaded = load_pretrained(save_pretrained(m, tmp_path / "m"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, m.lm_head.weight, atol=0, rtol=0)


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    a, b = make_model(seed=0), make_model(seed=1)
    save_pretrained(a, tmp_path / "m")
    save_pretrained(b, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    torch.testing.assert_close(load_pretrained(tmp_path / "m").lm_head.weight, b.lm_head.weight, atol=0, rtol=0)


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer_dir):
    out = save_pretrained(make_model(), tmp_path / "m", tokenizer_dir=tokenizer_dir)
    sha = file_sha256(out / "tokenizer.json")
    load_pretrained(out, expected_tokenizer_sha256=sha)  # fine
    with pytest.raises(TokenizerMismatchError, match="expected"):
        load_pretrained(out, expected_tokenizer_sha256="0" * 64)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["added_tokens"][0]["content"] = "<|other|>"
    (out / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerMismatchError, match="sha256"):
        load_pretrained(out)
    with pytest.raises(TokenizerMismatchError):
        Engine.from_pretrained(out)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_a_sharded_index_may_name_only_files_of_the_folder(tmp_path, tokenizer_dir, name):
    m = make_model()
    out = save_pretrained(m, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    weight_map = {k: "model-00001-of-00001.safetensors" for k in m.state_dict()}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(load_pretrained(out).lm_head.weight, m.lm_head.weight, atol=0, rtol=0)  # sharded
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map, "x": name}}))
    with pytest.raises(ValueError, match="shards must be files of"):
        load_pretrained(out)


def test_only_safetensors_are_loaded(tmp_path):
    out = save_pretrained(make_model(), tmp_path / "m")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(out)


def test_we_load_a_folder_written_by_transformers(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.n_kv_head == 2 and ours.config.intermediate_size == 64 and not ours.config.tie_embeddings
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_bf16_export_records_dtype(tmp_path):
    m = make_model().to(torch.bfloat16)
    out = save_pretrained(m, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(out)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(loaded(idx)[0], m(idx)[0], atol=0, rtol=0)
