"""`llmarch ablate`: train variants of one model on the same data and compare them.

    llmarch ablate --preset llama-tiny --vary norm=rmsnorm,layernorm --steps 300 --out runs/norm
    llmarch ablate --preset llama-tiny --variant swiglu:ffn=glu,d_ff=344 --variant gelu:ffn=mlp,activation=gelu \\
        --steps 300 --out runs/ffn
    llmarch ablate --study study.yaml --out runs/study [--steps 50]

Prints a table (one row per variant) and writes DIR/report.md with plots. Running it again reuses the variants
that finished; exit status 1 when a variant failed (the others still ran and are in the report).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from llmarch.cli.common import add_model_args, emit_json, table
from llmarch.cli.train import OPTIONS, add_options

RUNNER_OWNED = {"stop_at", "resume", "save_every", "keep_last", "samples", "sample_tokens", "parallel"}
TRAIN_OPTIONS = [o for o in OPTIONS if o[1] not in RUNNER_OWNED]


def add(sub) -> None:
    p = sub.add_parser("ablate", help="train variants of a model on the same data and compare them")
    add_model_args(p, required=False)
    p.add_argument("--study", metavar="FILE", help="a YAML study (base model, variants, settings)")
    p.add_argument("--vary", metavar="FIELD=V1,V2", action="append", default=[],
                   help="one axis of variants (repeatable: the cross product); train.X varies a training setting")
    p.add_argument("--variant", metavar="NAME:FIELD=V,FIELD=V", action="append", default=[],
                   help="a named variant setting several fields at once (repeatable); tuple items joined by +")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory: variants/, report.md, plots")
    p.add_argument("--eval-lengths", metavar="L1,L2", help="also evaluate perplexity at these sequence lengths")
    add_options(p, TRAIN_OPTIONS)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=run)


def study_from_args(args: argparse.Namespace):
    from llmarch.ablate.spec import Study, axes_variants, load_study, parse_variant, parse_vary

    train = {dest: getattr(args, dest) for _, dest, _, _ in TRAIN_OPTIONS
             if getattr(args, dest) is not None and dest != "progress"}
    lengths = None
    if args.eval_lengths:
        try:
            lengths = tuple(int(x) for x in args.eval_lengths.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--eval-lengths {args.eval_lengths!r}: expected integers like 128,256,512") from None
    command = "llmarch " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""
    if args.study:
        if args.preset or args.config or args.vary or args.variant or args.set:
            raise ValueError("--study FILE describes the model and its variants; drop --preset/--config/--set/"
                             "--vary/--variant (training options and --eval-lengths may override the file)")
        study = load_study(args.study)
        return dataclasses.replace(study, train={**study.train, **train},
                                   eval_lengths=lengths if lengths is not None else study.eval_lengths,
                                   command=command or study.command)
    if not (args.preset or args.config):
        raise ValueError("give a base model (--preset NAME or --config FILE) or a --study FILE")
    if not (args.vary or args.variant):
        raise ValueError("give the variants: --vary FIELD=V1,V2 and/or --variant NAME:FIELD=V,FIELD=V")
    base_set = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(base_set) != len(args.set):
        raise ValueError(f"--set {args.set}: expected FIELD=VALUE items")
    variants = [parse_variant(v) for v in args.variant]
    if args.vary:
        variants += axes_variants([parse_vary(v) for v in args.vary])
    return Study(base=args.config or args.preset, variants=tuple(variants), set=base_set, train=train,
                 eval_lengths=lengths or (), name=args.out.rstrip("/").split("/")[-1], command=command)


def run(args: argparse.Namespace) -> int:
    from llmarch.ablate import run_study, table as result_table, write_report

    study = study_from_args(args)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    results = run_study(study, args.out, progress=progress)
    report = write_report(study, results, args.out)
    if args.json:
        emit_json([{k: v for k, v in r.items() if k not in ("val_curve", "train_curve")} for r in results])
    else:
        header, rows = result_table(results, study.eval_lengths)
        print(table(rows, header))
        reused = [r["name"] for r in results if r.get("skipped")]
        if reused:
            print(f"reused finished variant(s): {', '.join(reused)}")
        print(f"report: {report}")
    return 1 if any(r.get("status") != "ok" for r in results) else 0
