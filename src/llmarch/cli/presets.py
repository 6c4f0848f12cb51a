"""`llmarch presets`: every named config with its parameter count (computed on the meta device)."""
from __future__ import annotations

from llmarch.cli.common import add_json_flag, emit_json, human, table


def add(sub) -> None:
    p = sub.add_parser("presets", help="list the named configs with parameter counts")
    p.add_argument("--filter", metavar="TEXT", help="only names containing TEXT")
    add_json_flag(p)
    p.set_defaults(func=run)


def count_params(cfg) -> int:
    import llmarch

    return sum(p.numel() for p in llmarch.build(cfg, device="meta").parameters())


def run(args) -> int:
    from llmarch import presets

    rows = []
    for name in presets.names():
        if args.filter and args.filter not in name:
            continue
        cfg = presets.get(name)
        n = count_params(cfg)
        rows.append(dict(name=name, kind=cfg.kind, params=n, published=presets.PUBLISHED_PARAMS.get(name),
                         d_model=cfg.d_model, layers=cfg.n_layers, heads=cfg.n_heads,
                         # a vision tower (kind "vision") has MHA, N learned positions and an MLP
                         kv_heads=getattr(cfg, "kv_heads", cfg.n_heads),
                         context=getattr(cfg, "max_seq_len", getattr(cfg, "n_positions", None)),
                         position=getattr(cfg, "position", "learned"), ffn=getattr(cfg, "ffn", "mlp")))
    if args.json:
        emit_json(rows)
        return 0
    print(table([[r["name"], r["kind"], human(r["params"]), r["params"], r["d_model"], r["layers"], r["heads"],
                  r["kv_heads"], r["context"], r["position"], r["ffn"]] for r in rows],
                ["preset", "kind", "params", "exact", "D", "L", "H", "G", "context", "positions", "ffn"]))
    return 0
