"""Pictures of a training run: loss curves from ``RUN_DIR/metrics.jsonl`` and MoE expert load per layer.

``metrics.jsonl``: one JSON object per logged step with ``step``, ``loss``, ``lr``, ``tokens_per_s`` and, when
evaluated, ``val_loss`` (the training loop's format).

Expert load (documented format; written by MoE training): ``DIR/expert_load.json`` holding
``{"tokens_per_expert": [[n_e for each expert] for each MoE layer], "layers": [layer index, ...] (optional),
"dropped_fraction": [per layer] (optional)}``, or else the last ``metrics.jsonl`` record with an ``expert_load``
key holding the same object (or just the nested list).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's step records, read like the trainer reads them (a line torn by a crash is skipped with a
    warning); a missing file or one with no step record is a message."""
    from llmarch.train.metrics import METRICS_FILE
    from llmarch.train.metrics import read_metrics as read_records

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a training run directory (llmarch train --out DIR)")
    records = [r for r in read_records(run_dir) if "step" in r]
    if not records:
        raise ValueError(f"{path}: no step records (each line is a JSON object with a 'step')")
    return records


def loss_figure(records: list[dict], title: str = "") -> Figure:
    """Training loss (and validation loss where logged) against step; learning rate on a second panel."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        raise ValueError("metrics.jsonl has no 'loss' or 'val_loss' values to plot")
    lr = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    fig = Figure(figsize=(9, 5.5 if lr else 4))
    axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1)) if lr else [fig.subplots()]
    ax = axes[0]
    if train:
        ax.plot(*zip(*train), lw=1.0, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tps = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    ax.set_title(title + (f"  (median {np.median(tps):,.0f} tokens/s)" if tps else ""))
    if lr:
        axes[1].plot(*zip(*lr), color="tab:green", lw=1.0)
        axes[1].set_ylabel("lr")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


def read_expert_load(checkpoint: str | Path) -> dict:
    """Find and validate expert-load statistics in a checkpoint/run directory (see the module docstring)."""
    d = Path(checkpoint)
    src = d / "expert_load.json"
    if src.is_file():
        data = json.loads(src.read_text())
    else:
        found = [r["expert_load"] for r in read_metrics(d) if "expert_load" in r] if (d / "metrics.jsonl").is_file() \
            else []
        if not found:
            raise FileNotFoundError(f"no expert-load statistics in {d}: expected expert_load.json or 'expert_load' "
                                    "records in metrics.jsonl (an MoE run writes them)")
        data = found[-1]
        src = d / "metrics.jsonl"
    if isinstance(data, list):
        data = {"tokens_per_expert": data}
    load = data.get("tokens_per_expert") if isinstance(data, dict) else None
    if not load or not all(isinstance(row, list) and row for row in load) or len({len(r) for r in load}) != 1:
        raise ValueError(f"{src}: tokens_per_expert must be a non-empty [layers][experts] list of numbers")
    layers = data.get("layers") or list(range(len(load)))
    return {"tokens_per_expert": np.asarray(load, dtype=float), "layers": layers,
            "dropped_fraction": data.get("dropped_fraction"), "source": str(src)}


def expert_load_figure(stats: dict, title: str = "") -> Figure:
    """Heatmap of each layer's load relative to uniform (1.0 = perfectly balanced) and the worst expert per layer."""
    load = stats["tokens_per_expert"]
    rel = load / load.sum(1, keepdims=True) * load.shape[1]  # 1 = uniform
    fig = Figure(figsize=(max(6, 0.5 * load.shape[1] + 5), max(3, 0.35 * load.shape[0] + 1.5)))
    ax, ax2 = fig.subplots(1, 2, width_ratios=(3, 1))
    im = ax.imshow(rel, cmap="coolwarm", vmin=0, vmax=max(2.0, float(rel.max())), aspect="auto",
                   interpolation="nearest")
    E = load.shape[1]
    ax.set_xticks(range(0, E, max(1, -(-E // 16))))  # whole experts, at most ~16 labels
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(stats["layers"])), [str(x) for x in stats["layers"]])
    ax.set_title("tokens per expert / uniform share")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax2.barh(range(len(rel)), rel.max(1), color="tab:red", label="busiest")
    ax2.barh(range(len(rel)), rel.min(1), color="tab:blue", label="idlest")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.invert_yaxis()
    ax2.set_yticks([])
    ax2.set_xlabel("load / uniform")
    ax2.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)  # above the bars
    fig.suptitle(title or "expert load")
    fig.tight_layout()
    return fig
