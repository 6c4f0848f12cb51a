"""The tiny vision-language model: train the projector (LLaVA), gated cross-attention (Flamingo-style) and joint
(cross-modal layers over [image; text]) fusions of the same parts on image-text pairs with ``llmarch train
--images``, report held-out answer accuracy beside chance and the training throughput, and draw held-out images
with the models' answers.

    PYTHONPATH=src python benchmarks/multimodal.py [--images digits] [--steps 1500] [--out runs/multimodal]

Writes RUN/<preset>/ (metrics.jsonl, eval.json, checkpoint), benchmarks/results/multimodal-<images>.json and
docs/img/multimodal-<images>.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PRESETS = ("llava-tiny", "llava-tiny-xattn", "llava-tiny-joint")
SHORT = {"llava-tiny": "proj", "llava-tiny-xattn": "xattn", "llava-tiny-joint": "joint"}


def train(preset: str, args, out: Path) -> dict:
    from llmarch.cli import main

    run = out / preset
    if not (run / "eval.json").is_file():
        main(["train", "--preset", preset, "--images", args.images, "--out", str(run), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.steps // 10),
              "--eval-every", str(args.steps // 3), "--no-progress", "--seed", str(args.seed)])
    return json.loads((run / "eval.json").read_text())


def figure(args, out: Path, path: Path, n: int = 10) -> None:
    """The first ``n`` held-out pairs with each fusion's greedy answer (green right, red wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmarch.checkpoint import load_model
    from llmarch.image_processing import ImageProcessor
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir
    from llmarch.train.image_loop import HELD_OUT, evaluate
    from llmarch.train.image_text import SOURCES, split

    _, test = split(SOURCES[args.images](args.seed), HELD_OUT, args.seed)
    test = test[:n]
    said = {}
    for preset in PRESETS:
        d = resolve_model_dir(out / preset)
        model = load_model(d).eval()
        px = ImageProcessor.for_size(model.config.vision.image_size)([p.image for p in test])
        said[preset] = evaluate(model, load_tokenizer_for(d), test, px, len(test))[2]
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.9))
    for i, (ax, p) in enumerate(zip(axes, test)):
        ax.imshow(p.image, cmap="gray_r" if p.image.mode == "L" else None)
        ax.set_xticks([]), ax.set_yticks([])
        lines = [f"{SHORT[k]}: {said[k][i]}" for k in PRESETS]
        ax.set_title(f"truth: {p.answer}", fontsize=8)
        ax.set_xlabel("\n".join(lines), fontsize=8,
                      color="green" if all(said[k][i] == p.answer for k in PRESETS) else "red")
    fig.suptitle(f"held-out {args.images}: \"{test[0].question}\" — greedy answers of the three fusions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="digits")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/multimodal")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on a "
                   "shared machine: 20x faster steps there)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out) / args.images
    results = {preset: train(preset, args, out) for preset in PRESETS}
    for preset, r in results.items():
        print(f"{preset:18s} {r['fusion']:16s} accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f}, "
              f"{r['held_out']} held out)  {r['tokens_per_s']:.0f} tokens/s  {r['images_per_s']:.1f} images/s")
    res = Path("benchmarks/results") / f"multimodal-{args.images}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps({"settings": vars(args), "results": results}, indent=1) + "\n")
    figure(args, out, Path("docs/img") / f"multimodal-{args.images}.png")


if __name__ == "__main__":
    main()
