"""Host memory reuse in CPU training: one training step (forward, cross-entropy, backward, fused AdamW,
``zero_grad(set_to_none=True)``) with glibc's default allocator against the same step after
``llmarch.nn.device.reuse_host_memory`` (what ``llmarch train`` does on the CPU), per model and tokens per step.

    PYTHONPATH=src python benchmarks/host_memory.py [--rounds 4] [--steps 5] [--tokens 16,128,512] [--threads 1]
    PYTHONPATH=src python benchmarks/host_memory.py --models "llama d512 L8,gpt2-124m" --tokens 2048 --rounds 2

A step reads one sequence of up to 512 tokens, more as rows of 512. Each round runs two fresh processes, one per
setting, in alternating order (a setting is process-wide and cannot be undone); each process times ``--steps``
steps after two warm-up steps and counts the minor page faults per step (``getrusage``). Reported: medians over
rounds, and default ÷ reuse. Writes benchmarks/results/host_memory.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

import llmarch  # noqa: E402
from llmarch.nn.device import reuse_host_memory  # noqa: E402

SMALL = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=8192)
CONFIGS = {
    "llama d512 L4": lambda: llmarch.preset("llama-tiny").replace(d_ff=1376, **SMALL),
    "mixtral d512 L4 E8": lambda: llmarch.preset("mixtral-tiny").replace(
        d_ff=1024, moe=dataclasses.replace(llmarch.preset("mixtral-tiny").moe, n_experts=8, top_k=2), **SMALL),
    # benchmarks/decoder.py's training models (run them with --tokens 2048: its 4 x 512 batch)
    "llama d512 L8": lambda: llmarch.preset("llama-tiny").replace(d_ff=1376, **dict(SMALL, n_layers=8)),
    "gpt2-124m": lambda: llmarch.preset("gpt2"),
}
DEFAULT_MODELS = "llama d512 L4,mixtral d512 L4 E8"


def child(args) -> dict:
    from decoder import ours_loss, train_step

    torch.set_num_threads(args.threads)
    applied = reuse_host_memory() if args.child == "reuse" else False
    out = {"applied": applied, "rows": []}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = llmarch.build(CONFIGS[name]())
        for T in args.tokens:
            ids = torch.randint(0, model.config.vocab_size, (max(1, T // 512), min(T, 512)))  # 2048: 4 x 512
            step = train_step(model, ids, ours_loss)
            step(), step()
            times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
            out["rows"].append(dict(model=name, tokens=T, step_s=statistics.median(times), faults=faults))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[16, 128, 512])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=["default", "reuse"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {"default": [], "reuse": []}
    for r in range(args.rounds):
        for mode in (("default", "reuse") if r % 2 == 0 else ("reuse", "default")):
            cmd = [sys.executable, __file__, "--child", mode, "--models", args.models, "--tokens",
                   ",".join(map(str, args.tokens)), "--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the {mode} process failed:\n{proc.stderr[-2000:]}")
            res = json.loads(proc.stdout)
            if mode == "reuse" and not res["applied"]:
                sys.exit("reuse_host_memory() did not apply here (not glibc, or malloc tuned in the environment)")
            runs[mode].append(res)
            print(f"round {r} {mode} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    rows, table = [], []
    for i, row in enumerate(runs["default"][0]["rows"]):
        med = {m: statistics.median(run["rows"][i]["step_s"] for run in runs[m]) for m in runs}
        flt = {m: statistics.median(run["rows"][i]["faults"] for run in runs[m]) for m in runs}
        rows.append(dict(model=row["model"], tokens=row["tokens"], step_s=med, faults_per_step=flt,
                         speedup=med["default"] / med["reuse"],
                         rounds={m: [run["rows"][i]["step_s"] for run in runs[m]] for m in runs}))
        table.append([row["model"], row["tokens"], med["default"] * 1e3, med["reuse"] * 1e3,
                      med["default"] / med["reuse"], int(flt["default"]), int(flt["reuse"])])
    print_table(table, ["model", "tokens/step", "default ms", "reuse ms", "default ÷ reuse", "faults default",
                        "faults reuse"])
    topic = "host_memory" if args.models == DEFAULT_MODELS else "host_memory_" + "_".join(
        m.split()[0] for m in args.models.split(","))
    path = write_results(topic, dict(settings=vars(args), load=os.getloadavg(), rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
