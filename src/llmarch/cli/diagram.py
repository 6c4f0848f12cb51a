"""`llmarch diagram`: the architecture of a config as Mermaid text (.mmd, or stdout) or a picture (.svg/.png)."""
from __future__ import annotations

from pathlib import Path

from llmarch.cli.common import MODEL_SPEC, add_model_args, config_from_args, human, model_title


def add(sub) -> None:
    p = sub.add_parser("diagram", help="draw a model's architecture (Mermaid .mmd, or a rendered .svg/.png)")
    p.add_argument("name", nargs="?", help=f"{MODEL_SPEC} (or use --preset / --config)")
    add_model_args(p, required=False)
    p.add_argument("-o", "--out", metavar="FILE", help="file.mmd | file.svg | file.png (default: Mermaid to stdout)")
    p.set_defaults(func=run)


def subtitle(cfg) -> str:
    from llmarch.analysis import count_params, forward_flops, kv_bytes_per_token
    from llmarch.cli.inspect import human_bytes

    pc = count_params(cfg)
    f = forward_flops(cfg, min(2048, cfg.max_seq_len), 1)
    active = f", {human(pc.active)} active" if pc.active != pc.total else ""
    kv = human_bytes(kv_bytes_per_token(cfg))
    images = ""
    if getattr(cfg, "vision", None) is not None:
        from llmarch.analysis.vision import image_summary

        s = image_summary(cfg)
        images = (f" · {s['image_tokens']} image tokens/image in context · "
                  f"{sum(s['flops_per_image'].values()):.3g} FLOPs/image")
    return (f"{human(pc.total)} parameters{active} · context {cfg.max_seq_len} · "
            f"{f.forward / f.tokens:.3g} fwd FLOPs/token{' (text)' if images else ''} · KV cache {kv}/token (bf16)"
            f"{images}")


def run(args) -> int:
    from llmarch.analysis.diagram import architecture, to_mermaid

    cfg = config_from_args(args, dirs=True)
    if cfg.kind == "vision":
        raise ValueError("a vision tower alone (kind vision) is not drawn; `llmarch inspect NAME` lists its parts")
    title = model_title(args)
    d = architecture(cfg, title)
    if not args.out:
        print(to_mermaid(d), end="")
        return 0
    out = Path(args.out)
    if out.suffix.lower() in (".mmd", ".mermaid", ".md"):
        text = to_mermaid(d)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"```mermaid\n{text}```\n" if out.suffix.lower() == ".md" else text)
    else:
        from llmarch.analysis.draw import render, save

        save(render(d, subtitle(cfg)), out)
    print(out)
    return 0
