"""The attention plot (pipelines/evaluate/attention_plot.py): a PNG of the layers and heads asked for; heads or
tokens that do not fit the maps are refused."""

import pytest
import torch

from model import GPT
from tests.helpers.models import tiny


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny()).eval()


def test_plot_attention_writes_png(model, tmp_path):
    from pipelines.evaluate.attention_plot import plot_attention

    tokens = ["To", " be", ",", " or", "\n", "🙂"]
    maps = model.attention_maps(torch.randint(0, 97, (1, 6)))
    path = plot_attention(maps, tokens, tmp_path / "attn.png", layers=[1], heads=[0, 2])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="heads"):
        plot_attention(maps, tokens, tmp_path / "x.png", heads=[9])
    with pytest.raises(ValueError, match="tokens"):
        plot_attention(maps, tokens[:3], tmp_path / "x.png")
