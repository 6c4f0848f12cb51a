"""Pictures of a model's attention weights on a prompt: one heat map per head for chosen layers (rows = the
query token, columns = the key token), from ``model(..., output_attentions=True)``."""
from __future__ import annotations

import torch
from matplotlib.figure import Figure


def attention_maps(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """{attention module name: weights [H, T, T]} of one prompt (the model's own self-attention modules)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return {name: w[0] for name, w in out.attentions.items() if w.shape[-1] == w.shape[-2]}


def attention_figure(maps: dict[str, torch.Tensor], tokens: list[str], layers: list[int] | None = None,
                     title: str = "") -> Figure:
    """A grid: one row per selected layer, one column per head; token labels on both axes when they fit."""
    names = list(maps)
    rows = [names[i] for i in (layers if layers is not None else range(len(names)))]
    H = maps[rows[0]].shape[0]
    T = len(tokens)
    cell = 1.9 if T <= 24 else 1.4
    fig = Figure(figsize=(cell * H + 1.2, cell * len(rows) + 0.9))
    axes = fig.subplots(len(rows), H, squeeze=False)
    for r, name in enumerate(rows):
        for h in range(H):
            ax = axes[r][h]
            ax.imshow(maps[name][h].float().numpy(), cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(name.replace(".layers.", " L").replace(".attn", ""), fontsize=8)
                if T <= 24:
                    ax.set_yticks(range(T), tokens, fontsize=5)
            if r == len(rows) - 1 and T <= 24:
                ax.set_xticks(range(T), tokens, fontsize=5, rotation=90)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
