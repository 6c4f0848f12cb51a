"""`llmarch plan`: training compute for a model and a token (or FLOP) budget: 6·N·D + attention, GPU-hours at an
MFU and accelerator peak, Chinchilla-optimal tokens; `--check` prints published figures beside the formulas."""
from __future__ import annotations

from llmarch.cli.common import MODEL_SPEC, add_json_flag, add_model_args, config_from_args, emit_json, human, preset_name, table


def add(sub) -> None:
    p = sub.add_parser("plan", help="training-compute planner (FLOPs, GPU-hours, Chinchilla tokens)")
    p.add_argument("name", nargs="?", help=f"{MODEL_SPEC} (or use --preset / --config)")
    add_model_args(p, required=False)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, help="training tokens (default: Chinchilla-optimal, 20/param)")
    budget.add_argument("--flops", type=float, help="a FLOP budget instead of a token count")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: the length the preset's paper "
                   "pre-trained at, else the model's context)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation, 0..1 (default 0.4)")
    p.add_argument("--accelerator", default="h100", help="a100 | h100 | h200 | v100 | tpu-v4 | peak FLOP/s")
    p.add_argument("--gpus", type=int, default=1, help="devices in parallel, for wall-clock days (default 1)")
    p.add_argument("--check", action="store_true", help="print published training-compute figures beside the "
                   "formulas (GPT-3 175B, Llama-2-70B, and the seeds' Mistral 7B and GPT-4 figures) and exit")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from llmarch.analysis import planner

    if args.check:
        return check(args)
    cfg = config_from_args(args, dirs=True)
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len: must be a positive number of tokens, got {args.seq_len}")
    name = preset_name(args)
    if args.flops:
        plan = planner.plan_flops(cfg, args.flops, args.seq_len, name)
    else:
        tokens = args.tokens or planner.chinchilla_tokens(planner.count_params(cfg).active)
        plan = planner.plan_tokens(cfg, tokens, args.seq_len, name)
    hours = planner.gpu_hours(plan.flops, args.accelerator, args.mfu)
    out = dict(params=plan.params, tokens=plan.tokens, seq_len=plan.seq_len, seq_len_source=plan.seq_len_source,
               six_nd=plan.six_nd, attention=plan.attention, attention_dense=plan.attention_dense,
               attention_counting=plan.counting, flops=plan.flops, chinchilla_tokens=planner.chinchilla_tokens(plan.params),
               accelerator=args.accelerator, peak_flops=planner.peak_flops(args.accelerator), mfu=args.mfu,
               gpu_hours=hours, gpus=args.gpus, days=hours / args.gpus / 24)
    roof = None
    if args.accelerator.lower() in planner.BANDWIDTH and cfg.kind != "encoder":
        roof = planner.decode_roofline(cfg, args.accelerator, context=plan.seq_len)
        out["decode_roofline"] = roof
    if args.json:
        emit_json(out)
        return 0
    rows = [["parameters N (active per token)", human(plan.params)], ["training tokens D", human(plan.tokens)],
            ["Chinchilla-optimal tokens (20·N)", human(out["chinchilla_tokens"])],
            ["6·N·D", f"{plan.six_nd:.3e}"], [f"attention (seq_len {plan.seq_len})", f"{plan.attention:.3e}"],
            ["training FLOPs", f"{plan.flops:.3e}"],
            [f"GPU-hours ({args.accelerator}, {out['peak_flops']:.3g} FLOP/s peak, MFU {args.mfu})", f"{hours:,.0f}"],
            [f"days on {args.gpus} device(s)", f"{out['days']:,.1f}"]]
    if roof is not None:
        rows.append([f"decode roofline, batch 1, context {roof['context']} ({roof['dtype']}, {roof['bound']}-bound)",
                     f"{roof['tokens_per_s']:,.0f} tokens/s"])
    print(table(rows, ["quantity", "value"]))
    print(f"seq_len {plan.seq_len}: {plan.seq_len_source}")
    dense = f"; over the dense T×T it would be {plan.attention_dense:.3e}" if plan.attention_dense != plan.attention \
        else ""
    print(f"attention: {plan.counting}{dense}")
    return 0


def check(args) -> int:
    from llmarch.analysis.planner import published_checks

    rows = published_checks()
    if args.json:
        emit_json(rows)
        return 0
    print(table([[r["preset"], human(r["params"]), human(r["tokens"]) + (" (implied)" if r["tokens_implied"] else ""),
                  f"{r['six_nd']:.3e}",
                  f"{r['with_attention']:.3e}", f"{r['published']:.3g}", f"{r['ratio_6nd_to_published']:.3f}"]
                 for r in rows],
                ["model", "N", "D", "6·N·D", "+ attention", "published", "6ND / published"]))
    for r in rows:
        print(f"- {r['preset']}: published figure from {r['source']}.", r["note"])
        if "implied_mfu" in r:
            print(f"  published {r['published_gpu_hours']:,} {r['accelerator']} GPU-hours imply MFU "
                  f"{r['implied_mfu']:.2f} for 6·N·D.")
    return 0
