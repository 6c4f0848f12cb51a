"""`llmarch plan --mesh dp=2,tp=2`: per-rank memory (parameters, gradients, AdamW, activations) and bytes sent per
step by each parallel axis, for the mesh the same flags give ``llmarch train``."""
from __future__ import annotations

from llmarch.cli.common import emit_json, human, table


def add_mesh_args(p) -> None:
    p.add_argument("--mesh", metavar="AXIS=N,...", help="per-rank memory and communication on a device mesh, "
                   "e.g. dp=8,tp=8 (axes dp tp ep pp)")
    p.add_argument("--batch-size", type=int, default=1, help="with --mesh: sequences per data-parallel rank "
                   "(default 1)")
    p.add_argument("--dtype", default="bf16", help="with --mesh: parameter and activation dtype (default bf16)")
    p.add_argument("--ddp", action="store_true", help="with --mesh: replicate over dp (DDP) instead of FSDP2")
    p.add_argument("--sp", action="store_true", help="with --mesh: sequence parallel on the tp ranks (norms and "
                   "block inputs split over the sequence)")


def run_mesh(args, cfg, seq_len: int) -> int:
    from llmarch.analysis.parallel_plan import mesh_plan, parse_mesh
    from llmarch.train.parallel.mesh import spec_for

    mesh = parse_mesh(args.mesh)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    world = mesh["dp"] * mesh["tp"] * mesh["pp"]
    spec_for(cfg, world, **mesh)  # the same validation as llmarch train
    if args.sp and mesh["tp"] < 2:
        raise ValueError("--sp: sequence parallel needs tp >= 2 in --mesh (e.g. --mesh tp=2 --sp)")
    out = mesh_plan(cfg, seq_len, args.batch_size, args.dtype, fsdp=not args.ddp, sp=args.sp, **mesh)
    out.update(mesh=mesh, world=world, seq_len=seq_len, batch_per_dp_rank=args.batch_size, dtype=args.dtype)
    if args.json:
        emit_json(out)
        return 0
    gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
    rows = [["parameters", human(out["params"])], ["weights", gib(out["weights"])], ["gradients", gib(out["grads"])],
            ["AdamW state (fp32 m, v)", gib(out["adamw"])], ["activations (no checkpointing)", gib(out["activations"])],
            ["activations (checkpointed blocks)", gib(out["activations_checkpointed"])], ["total", gib(out["total"])]]
    rows += [[f"sent per step: {k}", gib(out[f"comm_{k}"])] for k in ("dp", "tp", "ep", "pp") if out[f"comm_{k}"]]
    print(table(rows, [f"per rank ({world} ranks: " + ", ".join(f"{k}={v}" for k, v in mesh.items()) + ")",
                       "value"]))
    notes = ["sequence parallel"] if args.sp else []
    notes += [f"1F1B over {mesh['pp']} micro-batches"] if mesh["pp"] > 1 else []
    print(f"seq_len {seq_len}, {args.batch_size} sequence(s) per data-parallel rank, {args.dtype}, "
          f"{'DDP' if args.ddp else 'FSDP2'} over dp" + "".join(", " + n for n in notes))
    return 0
