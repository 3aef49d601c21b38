"""Attention heatmaps: one panel per (layer, head), tokens on the axes.

>>> maps = model.attention_maps(idx)              # (n_layer, B, n_head, T, T)
>>> plot_attention(maps, ["To", " be", ",", " or"], "attention.png", layers=[0, 1])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch


def plot_attention(
    maps: torch.Tensor,
    tokens: Sequence[str],
    path,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch_index: int = 0,
) -> Path:
    """Render a layers x heads grid of attention heatmaps (query rows, key columns) to a PNG.

    maps: (n_layer, B, n_head, T, T) from GPT.attention_maps, or (n_layer, n_head, T, T).
    tokens: the T token strings, shown on both axes (thinned out when T is large).
    """
    import matplotlib  # lazily: the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if maps.dim() == 5:
        maps = maps[:, batch_index]
    if maps.dim() != 4:
        raise ValueError(f"maps must be (n_layer, [B,] n_head, T, T), got shape {tuple(maps.shape)}")
    n_layer, n_head, T, _ = maps.shape
    if len(tokens) != T:
        raise ValueError(f"tokens has {len(tokens)} entries but the maps cover {T} positions")
    layers = list(range(n_layer)) if layers is None else list(layers)
    heads = list(range(n_head)) if heads is None else list(heads)
    for name, chosen, limit in (("layers", layers, n_layer), ("heads", heads, n_head)):
        bad = [i for i in chosen if not 0 <= i < limit]
        if bad or not chosen:
            raise ValueError(f"{name} must be a non-empty list of indices in [0, {limit}), got {chosen}")

    labels = [repr(t)[1:-1] for t in tokens]  # make whitespace and newlines visible
    step = max(1, T // 32)
    ticks = list(range(0, T, step))
    size = max(2.0, min(6.0, 0.18 * T + 1.0))
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(size * len(heads), size * len(layers)), squeeze=False)
    data = maps.detach().float().cpu()
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(data[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tokens such as emoji may lack a glyph in the default font
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
