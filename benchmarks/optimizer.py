"""The optimizer step: torch's AdamW as llmarch's trainer makes it (``llmarch.train.optim.make_optimizer``: fused
where torch has the kernel for the parameters' device) against its per-tensor loop (torch's default on the CPU,
and what llmarch's trainer ran before) and its ``foreach`` form, over benchmarks/train.py's models, on random
gradients. The three take turns within each round; medians of the rounds. With ``--system-malloc`` freed host
memory goes back to the system (glibc's defaults), as in a process that has not called
``llmarch.nn.device.reuse_host_memory`` (``llmarch train`` does): the per-tensor loop's temporaries of a parameter
past 32 MB are then new pages on every step.

    PYTHONPATH=src python benchmarks/optimizer.py [--configs llama-bench,gpt2-124m,mixtral-bench] [--rounds 7]
        [--threads 1] [--system-malloc]

Prints a table of milliseconds per step and writes benchmarks/results/optimizer.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
import llmarch
from llmarch.nn.device import reuse_host_memory
from llmarch.train.optim import make_optimizer, param_groups
from train import CONFIGS


def optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    groups = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-5)
    return {"llmarch (make_optimizer)": make_optimizer(model, 1e-4),
            "per-tensor loop": torch.optim.AdamW(param_groups(model, 0.1), foreach=False, **groups),
            "foreach": torch.optim.AdamW(param_groups(model, 0.1), foreach=True, **groups)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="llama-bench,gpt2-124m,mixtral-bench")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's allocator at its defaults")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reused = False if args.system_malloc else reuse_host_memory()
    rows, results = [], []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        model = llmarch.build(CONFIGS[name][0])
        for q in model.parameters():
            q.grad = torch.randn_like(q) * 1e-3
        opts = optimizers(model)
        times: dict[str, list[float]] = {k: [] for k in opts}
        for r in range(args.rounds + 1):  # the first round makes the optimizers' state: not timed
            for k, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                if r:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = sum(q.numel() for q in model.parameters())
        for k, t in med.items():
            rows.append([name, f"{n / 1e6:.1f}M", k, t * 1e3, med["per-tensor loop"] / t])
            results.append(dict(config=name, parameters=n, optimizer=k, step_s=t, times=times[k],
                                vs_per_tensor=med["per-tensor loop"] / t))
    common.print_table(rows, ["config", "params", "optimizer", "ms/step", "x per-tensor"])
    out = common.write_results("optimizer", dict(threads=args.threads, host_memory_reused=reused, rounds=args.rounds,
                                                 results=results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
