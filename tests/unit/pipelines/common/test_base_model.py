"""pipelines/common/base_model.py: which bases quill can represent exactly."""

from __future__ import annotations

import pytest

from pipelines.common.base_model import BaseModelError, check_config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_bias", True),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("model_type", "mistral"),
        ("hidden_act", "gelu"),
    ],
)
def test_a_config_quill_cannot_represent_is_refused_naming_the_field(field, value):
    cfg = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        field: value,
    }
    with pytest.raises(BaseModelError) as err:
        check_config(cfg, "finetune.base some/folder")
    assert f"'{field}'" in str(err.value) and "\n" not in str(err.value)
