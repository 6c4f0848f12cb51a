"""`llmarch plan --mesh` against what 2 gloo processes on the CPU actually hold: per-rank parameters, AdamW moments
and the activations saved for the backward (the largest rank), for one small decoder on several meshes.

    python benchmarks/parallel_memory.py          # relaunches itself under torchrun with 2 processes

Activations are measured as the bytes of the distinct storages autograd saves during one forward and the training
loss (``ce_sum``) with ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded
(:func:`llmarch.analysis.activations.measure_saved_bytes`). Writes benchmarks/results/parallel_memory.json.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import llmarch  # noqa: E402
from benchmarks.common import print_table, write_results  # noqa: E402
from llmarch.analysis.activations import measure_saved_bytes  # noqa: E402
from llmarch.analysis.parallel_plan import mesh_plan  # noqa: E402
from llmarch.train.objectives import ce_sum  # noqa: E402

BASE = dict(vocab_size=512, d_model=64, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=128, max_seq_len=64)
B, T = 4, 32  # sequences per data-parallel rank, tokens
MESHES = [  # name, config changes, degrees, FSDP2
    ("ddp dp=2", {}, dict(dp=2), False),
    ("fsdp dp=2", {}, dict(dp=2), True),
    ("tp=2", {}, dict(tp=2), False),
    ("tp=2, 1 kv head", dict(n_kv_heads=1), dict(tp=2), False),
    ("tp=2, tied head", dict(tie_embeddings=True), dict(tp=2), False),
    ("tp=2, sp", {}, dict(tp=2, sp=True), False),
    ("pp=2 (1F1B, 2 micro-batches)", {}, dict(pp=2), False),
]


def local_numel(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def measure(cfg, degrees: dict, fsdp: bool) -> list[float]:
    """[parameters, AdamW bytes, saved activation bytes] of this rank after one step."""
    from llmarch.train.distributed import DistEnv
    from llmarch.train.parallel.apply import parallelize
    from llmarch.train.parallel.tensor import loss_context

    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    if "pp" in degrees:
        from llmarch.train.parallel import mesh as M
        from llmarch.train.parallel.pipeline import build_pipeline

        mesh = M.build_mesh(M.spec_for(cfg, 2, pp=2))
        stage, sched = build_pipeline(llmarch.build(cfg), mesh["pp"], 2, lambda x, y: ce_sum(x, y) / y.numel(),
                                      "1f1b")
        opt = torch.optim.AdamW(stage.parameters())
        run = lambda: sched.step(ids[:, :-1] if stage.first else None,  # noqa: E731
                                 target=ids[:, 1:] if stage.last else None)
        run()  # the first step also runs the stages' shape inference: measure the next, a steady one
        stage.zero_grad()
        act = measure_saved_bytes(run, stage.parameters())  # the most micro-batches in flight at once
        params = stage.parameters()
    else:
        env = DistEnv(dist.get_rank(), dist.get_world_size())
        tc = SimpleNamespace(**{**dict(dp=None, tp=1, ep=1, pp=1, seq_len=T), **degrees,
                                "sequence_parallel": degrees.get("sp", False),
                                "parallel": "fsdp" if fsdp or degrees.get("tp", 1) > 1 else "ddp"})
        model = parallelize(llmarch.build(cfg), cfg, env, tc)
        opt = torch.optim.AdamW(model.parameters())
        losses = []

        def step():
            with loss_context(model):
                logits = model(ids[:, :-1]).logits
                losses.append(ce_sum(logits, ids[:, 1:]))

        act = measure_saved_bytes(step, model.parameters())
        with loss_context(model):
            losses[0].backward()
        params = model.parameters()
    opt.step()
    adam = sum(local_numel(v) * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)
    return [float(sum(local_numel(p) for p in params)), float(adam), float(act)]


def main() -> None:
    dist.init_process_group("gloo")
    rows, out = [], []
    for name, changes, degrees, fsdp in MESHES:
        cfg = llmarch.preset("llama-tiny", **{**BASE, **changes})
        got = torch.tensor(measure(cfg, degrees, fsdp), dtype=torch.float64)
        dist.all_reduce(got, op=dist.ReduceOp.MAX)
        plan = mesh_plan(cfg, T, B, "fp32", fsdp=fsdp, **{"dp": 1, **degrees})
        planned = [plan["params"], plan["adamw"], plan["activations"]]
        ratios = [m / p for m, p in zip(got.tolist(), planned)]
        rows.append([name, *[int(x) for x in got.tolist()[:2]], got[2].item(), *planned, *ratios])
        out.append(dict(mesh=name, config=changes, degrees=degrees, fsdp=fsdp, measured=got.tolist(),
                        planned=planned, ratio=ratios))
    if dist.get_rank() == 0:
        print_table(rows, ["mesh", "params", "adamw B", "act B", "plan params", "plan adamw", "plan act",
                           "params x", "adamw x", "act x"])
        path = write_results("parallel_memory", dict(model=BASE, batch=B, seq_len=T, processes=2, rows=out))
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  "2", __file__], env=env))
