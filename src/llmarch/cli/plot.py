"""`llmarch plot`: pictures — attention patterns, RoPE, ALiBi, MoE expert load, training curves."""
from __future__ import annotations

from pathlib import Path

from llmarch.cli.common import MODEL_SPEC, add_model_args, config_from_args, model_title


def add(sub) -> None:
    p = sub.add_parser("plot", help="pictures: patterns | rope | alibi | experts | loss | attention")
    kinds = p.add_subparsers(dest="what", metavar="WHAT", required=True)

    q = kinds.add_parser("patterns", help="every attention pattern's mask (one exact PNG each + an overview)")
    q.add_argument("-o", "--out", default="patterns", metavar="DIR", help="output directory (default ./patterns)")
    q.add_argument("--n", type=int, default=32, help="tokens (mask size, default 32)")
    q.add_argument("--window", type=int, help="window W for windowed patterns (default n/4)")
    q.add_argument("--scale", type=int, default=8, help="pixels per (query, key) cell in the exact PNGs")
    q.add_argument("--bidirectional", action="store_true", help="no causal mask (encoders)")
    q.set_defaults(func=run_patterns)

    for name, helptext in (("rope", "RoPE frequencies and long-term decay"), ("alibi", "ALiBi slopes and biases")):
        q = kinds.add_parser(name, help=f"{helptext} (of a model, or the default config)")
        q.add_argument("name", nargs="?", help=f"{MODEL_SPEC} (or --preset / --config)")
        add_model_args(q, required=False)
        q.add_argument("-o", "--out", default=f"{name}.png", metavar="FILE")
        if name == "alibi":
            q.add_argument("--n", type=int, default=32, help="tokens (default 32)")
        q.set_defaults(func=run_rope if name == "rope" else run_alibi)

    q = kinds.add_parser("experts", help="MoE expert load per layer from a checkpoint/run directory")
    q.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="directory with expert_load.json or metrics.jsonl records holding 'expert_load'")
    q.add_argument("-o", "--out", default="experts.png", metavar="FILE")
    q.set_defaults(func=run_experts)

    q = kinds.add_parser("attention", help="a trained model's attention weights on a prompt, per layer and head")
    q.add_argument("--checkpoint", required=True, metavar="DIR", help="model directory, run directory or HF directory")
    q.add_argument("--prompt", required=True, help="text to look at (short prompts get token labels)")
    q.add_argument("--layers", help="comma-separated layer indices (default: all)")
    q.add_argument("-o", "--out", default="attention.png", metavar="FILE")
    q.set_defaults(func=run_attention)

    q = kinds.add_parser("loss", help="training and validation loss from RUN_DIR/metrics.jsonl")
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.add_argument("-o", "--out", default="loss.png", metavar="FILE")
    q.set_defaults(func=run_loss)


def _model(args):
    from llmarch.config import ModelConfig

    if args.name or args.preset or args.config:
        return config_from_args(args, dirs=True), model_title(args)
    return ModelConfig(), "default config"


def _save(fig, out: str) -> int:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(path)
    return 0


def run_patterns(args) -> int:
    from llmarch.analysis.pattern_plots import plot_patterns

    files = plot_patterns(args.out, n=args.n, window=args.window, scale=args.scale, causal=not args.bidirectional)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def run_rope(args) -> int:
    from llmarch.analysis.position_plots import rope_figure

    cfg, title = _model(args)
    if cfg.position != "rope":
        raise ValueError(f"position: {title} uses {cfg.position!r}, not rope; pick a RoPE model")
    r = cfg.rope
    return _save(rope_figure(cfg.dh, r, cfg.max_seq_len, title=f"RoPE of {title}: Dh={cfg.dh}, theta={r.theta:g}, "
                             f"scaling={r.scaling}"), args.out)


def run_alibi(args) -> int:
    from llmarch.analysis.position_plots import alibi_figure

    cfg, title = _model(args)
    return _save(alibi_figure(cfg.n_heads, args.n, title=f"ALiBi for {title} ({cfg.n_heads} heads)"), args.out)


def run_experts(args) -> int:
    from llmarch.analysis.run_plots import expert_load_figure, read_expert_load

    stats = read_expert_load(args.checkpoint)
    return _save(expert_load_figure(stats, title=f"expert load: {args.checkpoint}"), args.out)


def run_loss(args) -> int:
    from llmarch.analysis.run_plots import loss_figure, read_metrics

    return _save(loss_figure(read_metrics(args.run_dir), title=str(args.run_dir)), args.out)


def run_attention(args) -> int:
    from llmarch.analysis.attention_plots import attention_figure, attention_maps
    from llmarch.checkpoint import load_model
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    path = resolve_model_dir(args.checkpoint)
    model, tok = load_model(path).eval(), load_tokenizer_for(path)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt: the prompt encodes to no tokens; give some text")
    maps = attention_maps(model, ids)
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers: expected comma-separated integers, got {args.layers!r}") from None
        bad = [i for i in layers if not 0 <= i < len(maps)]
        if bad:
            raise ValueError(f"--layers: {bad} outside [0, {len(maps)}) (the model's attention layers)")
    tokens = [tok.decode([i]).replace("\n", "\\n").replace(" ", "\u2423") for i in ids]  # spaces shown as ␣
    return _save(attention_figure(maps, tokens, layers, title=f"attention of {args.checkpoint} on {args.prompt!r}"),
                 args.out)
