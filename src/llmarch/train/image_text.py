"""Image-text pairs that exist on this machine without downloads, for training a small vision-language model:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (Alpaydin & Kaynak 1998; 1,797 images), asked
  "what digit is this?" and answered with the digit's name;
- ``shapes``: Pillow-rendered 32x32 images of 1-4 circles or squares, asked "how many circles?" /
  "how many squares?" (asked of the shape drawn) and answered with the count's name.

Each pair becomes ``[bos] (image tokens) Q: <question> A:`` followed by `` <answer>`` and eos, trained on the answer
and eos only. The split is fixed by ``seed``: ``held_out`` of the pairs are never trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmarch.registry import Registry

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SOURCES: Registry = Registry("images (image-text source)")


@dataclass
class Pair:
    image: object  # a PIL image
    question: str
    answer: str


@SOURCES.register("digits")
def digits(seed: int = 0) -> list[Pair]:
    """1,797 pairs; answers are one of 10 names (chance 10%)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images * (255 / 16)).round().astype(np.uint8)  # 0..16 ink -> 0..255
    return [Pair(Image.fromarray(p, mode="L"), "what digit is this?", NAMES[int(t)]) for p, t in zip(pixels, d.target)]


@SOURCES.register("shapes")
def shapes(seed: int = 0, n: int = 2000, size: int = 32) -> list[Pair]:
    """``n`` pairs of 1-4 non-overlapping circles or squares in random colours (chance 25% per question)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shape, count = rng.choice(("circle", "square")), rng.randint(1, 4)
        im = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        cells = rng.sample([(x, y) for x in range(2) for y in range(2)], count)  # one shape per quadrant
        for cx, cy in cells:
            r = rng.randint(4, 6)
            x = cx * size // 2 + rng.randint(r, size // 2 - r)
            y = cy * size // 2 + rng.randint(r, size // 2 - r)
            colour = tuple(rng.randint(0, 180) for _ in range(3))
            box = (x - r, y - r, x + r, y + r)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        out.append(Pair(im, f"how many {shape}s?", NAMES[count]))
    return out


def split(pairs: list[Pair], held_out: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) by a seeded shuffle."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, int(len(pairs) * held_out))
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


def prompt_text(question: str) -> str:
    return f"Q: {question} A:"


def encode_pairs(pairs: list[Pair], tok, vision, with_answer: bool = True):
    """Token rows, right-padded: ids [B, T], attention mask [B, T] and loss mask [B, T] (1 on the answer and
    eos, the tokens the model predicts). Without the answer: the prompts alone, left-padded (for generation)."""
    from llmarch.infer.images import with_image_tokens

    rows, targets = [], []
    for p in pairs:
        prompt = with_image_tokens([tok.bos_id] + tok.encode(prompt_text(p.question)), vision, 1, tok.bos_id)
        answer = tok.encode(" " + p.answer) + [tok.eos_id] if with_answer else []
        rows.append(prompt + answer)
        targets.append([0] * len(prompt) + [1] * len(answer))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r, t) in enumerate(zip(rows, targets)):
        sl = slice(0, len(r)) if with_answer else slice(T - len(r), T)
        ids[i, sl], mask[i, sl], loss_mask[i, sl] = torch.tensor(r), 1, torch.tensor(t)
    return ids, mask, loss_mask


__all__ = ["NAMES", "Pair", "SOURCES", "digits", "encode_pairs", "prompt_text", "shapes", "split"]
