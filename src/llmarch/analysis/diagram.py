"""The architecture of a config as a small graph (nodes + edges), written as Mermaid text; ``draw.py`` renders the
same graph with matplotlib. Everything shown is read from the config: the embedding and position scheme, the block
wiring (pre- or post-norm), attention heads (MHA / GQA / MQA) and pattern, the FFN (MLP, GLU or MoE), the head."""
from __future__ import annotations

from dataclasses import dataclass, field

from llmarch.analysis.moe import moe_spec

KINDS = ("io", "embed", "norm", "attn", "ffn", "moe", "add", "head")


@dataclass
class Node:
    id: str
    label: str  # lines separated by "\n"
    kind: str  # one of KINDS (picks the colour)
    in_block: bool = False


@dataclass
class Diagram:
    title: str
    nodes: list[Node]
    edges: list[tuple[str, str]]  # the main data path, in order
    residuals: list[tuple[str, str]]  # skip connections into an "add" node
    block_label: str
    notes: list[str] = field(default_factory=list)


def attention_label(cfg) -> str:
    H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.dh
    kind = "MHA" if G == H else "MQA" if G == 1 else "GQA"
    lines = [f"{'causal ' if cfg.kind == 'decoder' else ''}self-attention, {kind}",
             f"H={H} q heads, G={G} kv heads, Dh={Dh}"]
    pats = list(dict.fromkeys(cfg.pattern))
    pat = "/".join(pats) + (f" (W={cfg.window})" if cfg.window else "")
    lines.append(f"pattern: {pat}" + (" cycled per layer" if len(pats) > 1 else ""))
    if cfg.position == "rope":
        r = cfg.rope
        extra = f", {r.scaling} x{r.factor:g}" if r.scaling != "none" else ""
        part = f", {r.fraction:g} of Dh" if r.fraction < 1 else ""
        lines.append(f"RoPE on q,k (theta={r.theta:g}{part}{extra})")
    elif cfg.position == "alibi":
        lines.append("ALiBi bias on scores")
    return "\n".join(lines)


def ffn_label(cfg) -> tuple[str, str]:
    moe = moe_spec(cfg)
    bias = " +bias" if cfg.ffn_bias else ""
    dense = (f"MLP ({cfg.activation}){bias}\nD={cfg.d_model} -> F={cfg.d_ff} -> D" if cfg.ffn == "mlp" else
             f"{cfg.ffn.upper()} ({cfg.activation}){bias}\nD={cfg.d_model} -> 2x F={cfg.d_ff} (gate, up) -> D")
    if moe is None:
        return dense, "ffn"
    lines = [f"MoE: {moe.num_experts} experts ({cfg.ffn}, F={moe.expert_ff}), top-{moe.top_k} router"]
    if moe.n_shared:
        lines.append(f"+ {moe.n_shared} shared expert(s), F={moe.shared_ff}")
    if moe.every > 1 or moe.first_dense:
        lines.append(f"on every {moe.every}. layer from layer {moe.first_dense}; else dense F={cfg.d_ff}")
    return "\n".join(lines), "moe"


NORM_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}


def norm_label(cfg) -> str:
    has_bias = cfg.norm == "layernorm" and cfg.norm_bias
    return NORM_NAMES.get(cfg.norm, cfg.norm) + (" +bias" if has_bias else "")


def architecture(cfg, title: str = "") -> Diagram:
    """The graph of ``cfg``: embeddings, one block (repeated L times), the final norm and the head."""
    nodes = [Node("ids", "input ids [B, T]", "io")]
    emb = f"token embedding\nV={cfg.vocab_size} x D={cfg.d_model}"
    if cfg.position in ("learned", "sinusoidal"):
        emb += f"\n+ {cfg.position} positions" + (f" ({cfg.max_seq_len} x D)" if cfg.position == "learned" else "")
    nodes.append(Node("emb", emb, "embed"))
    if cfg.embed_norm:
        nodes.append(Node("emb_norm", f"embedding {norm_label(cfg)}", "norm"))
    entry = nodes[-1].id
    attn = Node("attn", attention_label(cfg), "attn", True)
    ffn_text, ffn_kind = ffn_label(cfg)
    ffn = Node("ffn", ffn_text, ffn_kind, True)
    n1, n2 = Node("norm1", norm_label(cfg), "norm", True), Node("norm2", norm_label(cfg), "norm", True)
    add1, add2 = Node("add1", "+", "add", True), Node("add2", "+", "add", True)
    if cfg.norm_placement == "pre":  # x + attn(norm(x)); h + ffn(norm(h))
        block = [n1, attn, add1, n2, ffn, add2]
        residuals = [(entry, "add1"), ("add1", "add2")]
    else:  # norm(x + attn(x)); norm(h + ffn(h))
        block = [attn, add1, n1, ffn, add2, n2]
        residuals = [(entry, "add1"), ("norm1", "add2")]
    nodes += block
    if cfg.final_norm:
        nodes.append(Node("final_norm", f"final {norm_label(cfg)}", "norm"))
    head = f"LM head D -> V={cfg.vocab_size}" + (" (tied to embedding)" if cfg.tie_embeddings else "")
    nodes.append(Node("head", head + (" +bias" if cfg.head_bias else ""), "head"))
    nodes.append(Node("logits", "logits [B, T, V]", "io"))
    edges = [(a.id, b.id) for a, b in zip(nodes, nodes[1:])]
    notes = [f"kind {cfg.kind}: {cfg.kind.replace('_', '-')} stacks are drawn as one block"] if cfg.kind != "decoder" \
        else []
    return Diagram(title or "model", nodes, edges, residuals,
                   f"block x {cfg.n_layers} ({cfg.norm_placement}-norm)", notes)


def _mermaid_text(label: str) -> str:
    return label.replace('"', "#quot;").replace("\n", "<br/>")


MERMAID_STYLE = {"io": "fill:#eeeeee,stroke:#777", "embed": "fill:#d6e9f8,stroke:#3a7bbf",
                 "norm": "fill:#fff4c2,stroke:#b59b00", "attn": "fill:#f8d7d3,stroke:#c0392b",
                 "ffn": "fill:#d8f0d8,stroke:#2e8b57", "moe": "fill:#e6dcf5,stroke:#6a3d9a",
                 "add": "fill:#ffffff,stroke:#333", "head": "fill:#d6e9f8,stroke:#3a7bbf"}


def to_mermaid(d: Diagram) -> str:
    """Mermaid ``flowchart`` text: the block is a subgraph, residuals are dotted edges."""
    lines = ["---", f"title: {d.title}", "---", "flowchart TB"]

    def node(n: Node) -> str:
        shape = ('(("', '"))') if n.kind == "add" else ('["', '"]')
        return f'  {n.id}{shape[0]}{_mermaid_text(n.label)}{shape[1]}:::{n.kind}'

    lines += [node(n) for n in d.nodes if not n.in_block]
    lines.append(f'  subgraph block["{_mermaid_text(d.block_label)}"]')
    lines += ["  " + node(n) for n in d.nodes if n.in_block]
    lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in d.edges]
    lines += [f"  {a} -. residual .-> {b}" for a, b in d.residuals]
    lines += [f"  classDef {k} {v}" for k, v in MERMAID_STYLE.items()]
    lines += [f"  %% {note}" for note in d.notes]
    return "\n".join(lines) + "\n"
