"""Pictures of the attention patterns: every entry of the ``PATTERNS`` registry renders its own boolean mask
(``Pattern.render(n)``), so a newly registered pattern appears without changes here.

Each mask is written as an exact PNG (``scale`` × ``scale`` pixels per (query, key) cell; coloured = may attend,
white = masked), which tests read back pixel for pixel, plus one overview figure with every pattern titled.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ALLOWED_RGB = (31, 119, 180)
MASKED_RGB = (255, 255, 255)


def pattern_masks(n: int = 32, window: int | None = None, causal: bool = True,
                  **pattern_args) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """{name: [n, n] bool mask} for every registered pattern, and {name: reason} for those that could not be
    built. ``pattern_args`` are :class:`~llmarch.attention_config.SparseConfig` fields (block size, stride, global
    tokens, ...); they default to :func:`picture_sparse`."""
    from llmarch.nn.patterns import PATTERNS, build_pattern

    window = window or max(2, n // 4)
    sparse = picture_sparse(n, **pattern_args)
    masks, skipped = {}, {}
    for name in PATTERNS.names():
        try:
            pattern = build_pattern(name, window=window, sparse=sparse)  # as the model's stack builds it
            masks[name] = pattern.render(n, causal=causal).bool()
        except (TypeError, ValueError) as e:  # a pattern that needs more settings than given
            skipped[name] = str(e)
            log.warning("pattern %r not drawn: %s", name, e)
    return masks, skipped


def picture_sparse(n: int, **fields):
    """Sparse-pattern settings that show on an n-token picture: blocks of n/8, stride n/4, summary n/16, token 0
    global, one random block (the model defaults are sized for thousands of tokens); ``fields`` override them."""
    from llmarch.attention_config import SparseConfig

    return SparseConfig(**{"block": max(2, n // 8), "stride": max(2, n // 4), "summary": max(1, n // 16),
                           "global_tokens": (0,), "random_blocks": 1, **fields})


def mask_image(mask: torch.Tensor, scale: int = 8) -> np.ndarray:
    """[n, n] bool -> [n*scale, n*scale, 3] uint8 RGB (coloured where attention is allowed)."""
    m = np.kron(mask.cpu().numpy().astype(np.uint8), np.ones((scale, scale), dtype=np.uint8)).astype(bool)
    img = np.empty(m.shape + (3,), dtype=np.uint8)
    img[m], img[~m] = ALLOWED_RGB, MASKED_RGB
    return img


def save_mask_png(mask: torch.Tensor, path: str | Path, scale: int = 8) -> Path:
    """Write the mask as a PNG with exactly ``scale`` pixels per cell (no resampling, no axes)."""
    import matplotlib.image as mpimg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, mask_image(mask, scale), format="png")
    return path


def read_mask_png(path: str | Path, scale: int) -> torch.Tensor:
    """Inverse of :func:`save_mask_png`: the [n, n] bool mask back from the pixels (cell centres sampled)."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]  # float RGB in [0, 1]
    centres = img[scale // 2::scale, scale // 2::scale]
    return torch.from_numpy((np.abs(centres - 1.0).sum(-1) > 1e-3))


def overview_figure(masks: dict[str, torch.Tensor], cols: int = 4, title: str = "") -> Figure:
    """All masks side by side, titled with the pattern name and the fraction of pairs attended."""
    rows = -(-len(masks) // cols)
    fig = Figure(figsize=(3 * cols, 3.2 * rows + 0.4))
    for i, (name, mask) in enumerate(masks.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(mask_image(mask, 1), interpolation="nearest")
        ax.set_title(f"{name}  ({100 * mask.float().mean():.0f}% of pairs)", fontsize=10)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_patterns(out_dir: str | Path, n: int = 32, window: int | None = None, scale: int = 8,
                  causal: bool = True, **pattern_args) -> dict[str, Path]:
    """Write ``pattern_<name>.png`` (exact pixels) for every pattern and ``patterns.png`` (the overview)."""
    out_dir = Path(out_dir)
    masks, skipped = pattern_masks(n, window, causal, **pattern_args)
    if not masks:
        raise ValueError(f"no pattern could be drawn: {skipped}")
    files = {name: save_mask_png(m, out_dir / f"pattern_{name}.png", scale) for name, m in masks.items()}
    w, sp = window or max(2, n // 4), picture_sparse(n, **pattern_args)
    fig = overview_figure(masks, cols=min(4, len(masks)),
                          title=f"attention patterns, {n} tokens{' causal' if causal else ' bidirectional'}: window "
                                f"{w}, block {sp.block}, stride {sp.stride}, global tokens {list(sp.global_tokens)}, "
                                f"{sp.random_blocks} random block(s)")
    files["overview"] = out_dir / "patterns.png"
    fig.savefig(files["overview"], dpi=100)
    return files
