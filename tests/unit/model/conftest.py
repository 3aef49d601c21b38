"""The model/ tests' tiny generation setup: a byte-level BPE of a few sentences (tests/helpers/generation.py), a
random tiny model on it and its engine, and a tokenizer folder for Hugging Face I/O. A module that needs another
model or engine defines its own fixture of that name (test_transformer.py, test_scoring.py, test_scheduler.py,
test_sampler.py)."""

import json

import pytest
import torch

from model import GPT, Engine, GPTConfig
from tests.helpers.generation import EOT, make_tokenizer
from tests.helpers.tokenizers import byte_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), block_size=96, n_embd=32)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, tokenizer)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = byte_bpe(["To be, or not to be, that is the question.", "Émoji 🙂 and 中文 text."] * 5, specials=[EOT])
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT})
    )
    return d
