"""`llmarch inspect`: parameters by component, FLOPs, KV cache and memory of a config, with the seed closed forms
beside the exact numbers."""
from __future__ import annotations

from llmarch.cli.common import MODEL_SPEC, add_json_flag, add_model_args, config_from_args, emit_json, model_title, human, table


def add(sub) -> None:
    p = sub.add_parser("inspect", help="parameters, FLOPs, KV cache and memory of a model (no weights needed)")
    p.add_argument("name", nargs="?", help=f"{MODEL_SPEC} (or use --preset / --config)")
    add_model_args(p, required=False)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--dtype", default="bf16", help="weights/activations/KV dtype: bf16 fp16 fp32 fp8 int8 int4")
    add_json_flag(p)
    p.set_defaults(func=run)


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(title: str, r) -> str:
    """The human form of an :class:`llmarch.analysis.Report`."""
    p, f = r.params, r.flops
    out = [f"{title}  (seq_len {r.seq_len}, batch {r.batch}, {r.dtype})", ""]
    rows = [[k, v, f"{100 * v / p.total:.2f}%"] for k, v in p.components.items() if v]
    rows.append(["total", p.total, "100.00%"])
    if p.active != p.total:
        rows.append(["active per token", p.active, f"{100 * p.active / p.total:.2f}%"])
    out += ["Parameters", table(rows, ["component", "params", "share"])]
    check = "" if r.meta_params is None else (
        f"  (= sum(numel) of the meta-device model: {r.meta_params:,})")
    out += [f"total {human(p.total)}{check}; non-embedding {human(p.non_embedding)}"]
    if len(p.stacks) > 1:
        out += ["by stack (blocks, positions, final norm): " + ", ".join(f"{k} {v:,}" for k, v in p.stacks.items())
                + "; shared embeddings and head counted once"]
    out += [f"closed form V·d + L(12d² + 13d) = {r.params_closed_form:,}", ""]
    out += [table([[c["term"], c["closed_form"], c["exact"], c["delta"], c["reason"]] for c in r.params_comparison],
                  ["term", "closed form", "exact", "delta", "why"]), ""]
    tok = f.tokens
    rows = [[name, v, v / tok, 3 * v / tok] for name, v in
            (("linear (q/k/v/o + ffn)", f.linear), ("attention (q·kᵀ, p·v)", f.attention), ("head", f.head),
             ("total", f.forward))]
    out += [f"FLOPs (one step = {r.batch} × {r.seq_len} tokens; matmuls, 2 per multiply-add)",
            table(rows, ["part", "forward/step", "forward/token", "training/token"])]
    if len(f.by_stack) > 1:
        out += ["linear + attention by stack: " + ", ".join(f"{k} {v:.4g}" for k, v in f.by_stack.items())
                + f" (cross-attention {f.cross_attention:.4g}; the decoder runs {r.seq_len} target tokens against "
                f"{r.seq_len} source tokens)"]
    decode = "an encoder does not generate" if r.decode_flops_per_token is None else \
        f"decode at context {r.seq_len}: {r.decode_flops_per_token:.4g}/token"
    out += [f"training/step {f.training:.4g} (3× forward; {f.training_recompute:.4g} with activation "
            f"checkpointing); {decode}"]
    if f.attention_useful is not None:
        out += [f"attention pairs the mask allows: {f.attention_useful:.4g} of {f.attention:.4g} computed densely"]
    out += [f"closed form (24·b·s·d² + 4·b·d·s²)·L + 2·b·s·d·V = {r.flops_closed_form:.6g}", ""]
    out += [table([[c["term"], c["closed_form"], c["exact"], c["delta"], c["reason"]] for c in r.flops_comparison],
                  ["term", "closed form", "exact", "delta", "why"]), ""]
    if r.kv_bytes_per_token:
        out += [f"KV cache: {human_bytes(r.kv_bytes_per_token)} per token; {human_bytes(r.kv_cache_bytes)} for "
                f"{r.batch} × {r.seq_len} tokens ({r.dtype})"]
    elif not r.state_bytes:
        out += ["KV cache: none (no incremental decoding for this model)"]
    if r.state_bytes:
        out += recurrent_lines(r)
    if r.cross_kv_bytes_per_source_token:
        out += [f"cross-attention k/v: {human_bytes(r.cross_kv_bytes_per_source_token)} per source token; "
                f"{human_bytes(r.cross_kv_cache_bytes)} for {r.batch} × {r.seq_len} source tokens"]
    out += [""]
    tm, im = r.training_memory, r.inference_memory
    rows = [[k.replace("_", " "), human_bytes(v)] for k, v in tm.items()]
    out += [f"Training memory ({r.dtype} weights and grads, fp32 AdamW moments and master copy)",
            table(rows, ["item", "bytes"]), ""]
    out += [f"Inference memory ({r.dtype}, context {r.seq_len})",
            table([[k.replace("_", " "), human_bytes(v)] for k, v in im.items()], ["item", "bytes"])]
    if p.notes:
        out += ["", "notes: " + "; ".join(p.notes)]
    return "\n".join(out)


def recurrent_lines(r) -> list[str]:
    """A hybrid's decoding memory: the recurrent layers' constant state beside the attention layers' KV cache."""
    from llmarch.analysis.memory import kv_cache_bytes, state_bytes
    from llmarch.analysis.linear_costs import mixer_schedule

    cfg = r.config
    lines = [f"layer schedule: {mixer_schedule(cfg) or cfg.mixers[0]}",
             f"recurrent state: {human_bytes(r.state_bytes)} for {r.batch} sequence(s), the same at any context "
             "(delta-rule state in fp32 + conv window)",
             f"effective decode memory (KV + state) at context {r.seq_len}: "
             f"{human_bytes(r.kv_cache_bytes + r.state_bytes)}"]
    contexts = [c for c in (4096, 32768, 262144) if c <= cfg.max_seq_len]
    if contexts:
        lines.append("  at " + ", ".join(f"{c}: {human_bytes(kv_cache_bytes(cfg, c, r.batch, r.dtype))} KV + "
                                         f"{human_bytes(state_bytes(cfg, r.batch, r.dtype))} state"
                                         for c in contexts))
    return lines


def run(args) -> int:
    from llmarch.analysis import analyze
    from llmarch.analysis.reach import effective_reach

    from llmarch.analysis.vision import image_summary

    cfg = config_from_args(args, dirs=True)
    images = image_summary(cfg) if cfg.kind == "vision" or getattr(cfg, "vision", None) is not None else None
    if cfg.kind == "vision":  # a vision tower alone
        if args.json:
            emit_json(images)
        else:
            print(format_images(model_title(args), images))
        return 0
    report = analyze(cfg, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype)
    reach = effective_reach(cfg)
    stored = quantization(args)
    if args.json:
        emit_json(dict(report.to_dict(), reach=dict(tokens=reach.tokens, per_layer=reach.per_layer,
                                                    paper_form=reach.paper_form), quantization=stored))
        return 0
    print(format_report(model_title(args), report))
    print(f"\nEffective reach: {reach.describe()}")
    if stored:
        print(f"\nStored quantized: {describe_quantization(stored)}")
    if images:
        print("\n" + format_images("images", images))
    return 0


def quantization(args) -> dict | None:
    """A quantized checkpoint's ``quantization.json`` (with its weight files' bytes), or None: the tables above
    count parameters at ``--dtype``, not as the directory stores them."""
    import json
    from pathlib import Path

    from llmarch.cli.common import model_spec

    spec = model_spec(args)
    if not spec or not Path(spec).is_dir():
        return None
    from llmarch.train.checkpoints import resolve_model_dir

    model_dir = resolve_model_dir(Path(spec))
    path = model_dir / "quantization.json"
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return dict(spec, weight_file_bytes=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")))


def describe_quantization(q: dict) -> str:
    mode = q.get("mode", "?")
    parts = [mode + (f", groups of {q['group_size']}" if q.get("group_size") else "")]
    if mode == "int8":
        parts.append(f"{q.get('activations', 'fp32')} activations")
    if q.get("skip"):
        parts.append(f"{len(q['skip'])} layers kept in full precision")
    return "; ".join(parts) + f" (quantization.json); weight files {human_bytes(q['weight_file_bytes'])}"


def format_images(title: str, s: dict) -> str:
    """The image side: parameters by part, image tokens in the context, FLOPs per image."""
    rows = [[k, v] for k, v in s["params"].items() if v] + [["total", sum(s["params"].values())]]
    flops = s["flops_per_image"]
    flops = flops if isinstance(flops, dict) else {"tower": flops}
    out = [f"{title}: parameters", table(rows, ["part", "params"]),
           f"image tokens in the context per image: {s['image_tokens']}"
           + (f" (features per image: {s['image_features']})" if "image_features" in s else ""),
           "FLOPs per image (matmuls, 2 per multiply-add): "
           + ", ".join(f"{k} {v:.4g}" for k, v in flops.items())]
    return "\n".join(out)
