"""The planner's activation bytes against what autograd saves, for every tiny decoder preset on one process:
``training_memory(cfg, T, B, "fp32")["activations"]`` beside the peak bytes of the storages saved for the backward
during one forward and the training loss (``measure_saved_bytes``, parameters excluded).

    python benchmarks/activation_memory.py        # writes benchmarks/results/activation_memory.json

Presets needing extra inputs (style, images) and encoder / encoder-decoder kinds are left out.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import llmarch  # noqa: E402
from benchmarks.common import print_table, write_results  # noqa: E402
from llmarch.analysis.activations import measure_saved_bytes  # noqa: E402
from llmarch.analysis.memory import training_memory  # noqa: E402
from llmarch.train.objectives import ce_sum  # noqa: E402

B, T = 4, 32


def main() -> None:
    torch.set_num_threads(1)
    rows, out = [], []
    for name in sorted(n for n in llmarch.presets.names() if n.endswith("-tiny")):
        cfg = llmarch.preset(name)
        if cfg.kind != "decoder" or cfg.vision is not None or cfg.condition is not None:
            continue
        torch.manual_seed(0)
        model = llmarch.build(cfg)
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
        got = measure_saved_bytes(lambda: ce_sum(model(ids[:, :-1]).logits, ids[:, 1:]), model.parameters())
        plan = training_memory(cfg, T, B, "fp32")["activations"]
        rows.append([name, cfg.mixer, "moe" if cfg.moe else cfg.ffn, got, int(plan), f"{got / plan:.3f}"])
        out.append(dict(preset=name, measured=got, planned=plan, ratio=got / plan))
    print_table(rows, ["preset", "mixer", "ffn", "saved B", "plan B", "saved / plan"])
    print(f"wrote {write_results('activation_memory', dict(batch=B, seq_len=T, dtype='fp32', rows=out))}")


if __name__ == "__main__":
    main()
