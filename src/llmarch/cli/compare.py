"""`llmarch compare A B ...`: presets or config files side by side (parameters, context, attention, positions,
activation, norm, FLOPs/token, KV cache/token; the image side of vision-language models)."""
from __future__ import annotations

from llmarch.cli.common import MODEL_SPEC, add_json_flag, emit_json, human, resolve_model, table


def add(sub) -> None:
    p = sub.add_parser("compare", help="compare models side by side (presets, config files, HF or llmarch directories)")
    p.add_argument("models", nargs="+", metavar="MODEL", help=f"each {MODEL_SPEC}")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs/token, capped at each model's context (default 2048)")
    p.add_argument("--dtype", default="bf16", help="KV-cache dtype (default bf16)")
    add_json_flag(p)
    p.set_defaults(func=run)


RECURRENT_MIXERS = ("mamba2", "linear", "gated_delta")  # mixers with a constant-size state instead of a KV cache


def attention_kind(cfg) -> str:
    from llmarch.analysis.linear_costs import mixer_schedule

    if len(cfg.mixers) > 1:
        return mixer_schedule(cfg) + f", GQA {cfg.n_heads}/{cfg.kv_heads}"
    if cfg.layer_mixer(0) in RECURRENT_MIXERS:  # no softmax attention at all
        return f"{cfg.layer_mixer(0)} in every layer (recurrent state, no attention)"
    G, H = cfg.kv_heads, cfg.n_heads
    kind = "MHA" if G == H else "MQA" if G == 1 else f"GQA {H}/{G}"
    if cfg.mixer == "latent":
        kind = f"MLA H={H} R={cfg.mla.kv_lora_rank}+{cfg.mla.qk_rope_head_dim}"
    elif cfg.mixer != "attention":
        kind += f" ({cfg.mixer})"
    if cfg.kind == "encoder_decoder":
        kind += " + cross"
    pats = "+".join(dict.fromkeys(cfg.pattern))
    return f"{kind}, {pats}" + (f" W={cfg.window}" if cfg.window else "")


def summary(cfg, seq_len: int, dtype: str) -> dict:
    from llmarch.analysis import count_params, forward_flops, kv_bytes_per_token
    from llmarch.analysis.layers import stacks
    from llmarch.analysis.memory import kv_cache_bytes, state_bytes
    from llmarch.analysis.reach import effective_reach

    pc = count_params(cfg)
    f = forward_flops(cfg, min(seq_len, cfg.max_seq_len), 1)  # a model never runs past its context
    m = cfg.moe
    ffn = f"{cfg.ffn} {cfg.activation}, F={cfg.d_ff}" if m is None else \
        (f"moe {m.n_experts}x{m.expert_ffn} top-{m.top_k}" + (f" +{m.n_shared} shared" if m.n_shared else "")
         + f" {cfg.activation}, F={m.expert_d_ff(cfg.d_ff)}")
    if cfg.ffn == "none":
        ffn = "none (mixer-only blocks)"
    layers = "+".join(str(s.n_layers) for s in stacks(cfg))
    extra = {"images": image_line(cfg)} if getattr(cfg, "vision", None) is not None else {}
    return dict(**extra, kind=cfg.kind, params=pc.total, active=pc.active, context=cfg.max_seq_len, layers=layers,
                d_model=cfg.d_model, attention=attention_kind(cfg), positions=cfg.position, ffn=ffn,
                norm=f"{cfg.norm} ({cfg.norm_placement})", tied=cfg.tie_embeddings,
                reach=effective_reach(cfg).tokens, flops_per_token=f.forward / f.tokens,
                kv_bytes_per_token=kv_bytes_per_token(cfg, dtype), state_bytes=state_bytes(cfg, 1, dtype),
                decode_memory=kv_cache_bytes(cfg, min(seq_len, cfg.max_seq_len), 1, dtype) + state_bytes(cfg, 1, dtype))


def image_line(cfg) -> str:
    """A vision-language model's image side in one cell: fusion, image tokens, image-side parameters and FLOPs."""
    from llmarch.analysis.vision import image_summary

    s = image_summary(cfg)
    where = f"@{','.join(map(str, cfg.vision.cross_layers))}" if cfg.vision.cross_layers else ""
    return (f"{cfg.vision.fusion}{where} · {s['image_tokens']} tok/img · {human(sum(s['params'].values()))} "
            f"params · {sum(s['flops_per_image'].values()):.3g} FLOPs/img")


def run(args) -> int:
    cols = {m: summary(resolve_model(m), args.seq_len, args.dtype) for m in args.models}
    if any("images" in c for c in cols.values()):  # a row for the image side; "-" for text models
        cols = {m: {"images": c.pop("images", "-"), **c} for m, c in cols.items()}
    if args.json:
        emit_json(cols)
        return 0
    fmt = {"params": human, "active": human, "flops_per_token": lambda v: f"{v:.3g}",
           "kv_bytes_per_token": lambda v: f"{v / 1024:.0f} KiB"}
    fmt["reach"] = lambda v: f"{v:,}"
    fmt["state_bytes"] = fmt["decode_memory"] = lambda v: f"{v / 2**20:.1f} MiB"
    label = {"images": "image side (fusion@layers)", "reach": "reach (tokens)", "flops_per_token": f"fwd FLOPs/token, T=min({args.seq_len}, ctx)", "kv_bytes_per_token": f"KV/token ({args.dtype})"}
    label.update(state_bytes="recurrent state (any context)", decode_memory=f"KV + state at T=min({args.seq_len}, ctx)")
    keys = list(next(iter(cols.values())))
    rows = [[label.get(k, k)] + [fmt.get(k, str)(c[k]) for c in cols.values()] for k in keys]
    print(table(rows, [""] + list(cols)))
    return 0
