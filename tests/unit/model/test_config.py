"""GPTConfig and its presets (model/config.py): the presets' sizes, validation that names the field, the dict
round trip."""

import pytest
import torch

from model import GPT, PRESETS, GPTConfig
from tests.helpers.models import tiny


def test_presets_build_valid_configs():
    assert {"tiny", "cpu", "124m", "350m"} <= set(PRESETS)
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        assert cfg.n_kv_head == cfg.n_head and cfg.intermediate_size > cfg.n_embd
    big = GPTConfig.from_preset("124m")
    assert (big.n_layer, big.n_embd, big.n_head, big.block_size) == (12, 768, 12, 1024)
    assert GPTConfig.from_preset("cpu", vocab_size=1000).vocab_size == 1000


def test_cpu_preset_is_a_few_million_params():
    with torch.device("meta"):
        n = GPT(GPTConfig.from_preset("cpu")).num_params(non_embedding=True)
    assert 1e6 < n < 2e7


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="tiny.*cpu.*124m.*350m"):
        GPTConfig.from_preset("huge")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_head"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-1), "block_size"),
        (dict(n_layer=1.5), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(n_embd=36, n_head=4), "n_embd // n_head"),  # odd head_dim
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace("/", "\\/")):
        tiny(**overrides)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = tiny(n_kv_head=2, tie_embeddings=False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
