"""The architecture of a config as a small graph (nodes + edges), written as Mermaid text; ``draw.py`` renders the
same graph with matplotlib. Everything shown is read from the config: the embedding and position scheme, each stack
(decoder, encoder, or encoder then decoder with cross-attention) drawn as one block repeated L times, wired pre- or
post-norm, the token mixer (MHA / GQA / MQA with its pattern, Longformer's global projection, or multi-head latent
attention), the FFN (MLP, GLU or MoE), the head; a vision-language model's tower and projector beside the decoder
(``diagram_vision.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from llmarch.analysis.diagram_vision import block_count, embedding_line, image_cross_label, joint_line, vision_graph
from llmarch.analysis.ffn import dense_kind, shared_width
from llmarch.analysis.layers import stacks

KINDS = ("io", "embed", "norm", "attn", "ffn", "moe", "add", "head")


@dataclass
class Node:
    id: str
    label: str  # lines separated by "\n"
    kind: str  # one of KINDS (picks the colour)
    group: str | None = None  # the repeated block (a key of Diagram.groups) this node belongs to
    beside: str | None = None  # drawn to the right of this node: a parallel branch (BERT's NSP head beside MLM)

    @property
    def in_block(self) -> bool:
        return self.group is not None


@dataclass
class Diagram:
    title: str
    nodes: list[Node]
    edges: list[tuple[str, str]]  # the data path, in order
    residuals: list[tuple[str, str]]  # skip connections into an "add" node
    groups: dict[str, str]  # block id -> its label ("block x L (pre-norm)")
    notes: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)  # a hybrid's mixer per layer (empty: one mixer everywhere)

    @property
    def block_label(self) -> str:
        return " / ".join(self.groups.values())


def _pattern_line(cfg) -> str:
    pats = list(dict.fromkeys(cfg.pattern))
    pat = "/".join(pats) + (f" (W={cfg.window})" if cfg.window else "")
    return f"pattern: {pat}" + (" cycled per layer" if len(pats) > 1 else "")


def _position_line(cfg, on: str) -> list[str]:
    if cfg.position == "rope":
        r = cfg.rope
        extra = f", {r.scaling} x{r.factor:g}" if r.scaling != "none" else ""
        part = f", {r.fraction:g} of Dh" if r.fraction < 1 else ""
        return [f"RoPE on {on} (theta={r.theta:g}{part}{extra})"]
    if cfg.position == "alibi":
        return ["ALiBi bias on scores"]
    if cfg.position == "relative":
        return [f"T5 relative bias ({cfg.rel_buckets} buckets x H, per stack)"]
    return []


def gated_delta_label(cfg) -> str:
    m = cfg.linear
    return "\n".join([f"gated delta rule (linear time, chunk {m.chunk_size})",
                      f"q,k: {m.n_k_heads} heads x Dk={m.k_head_dim}; v,z: {m.n_v_heads} heads x Dv={m.v_head_dim}",
                      f"causal conv K={m.conv_kernel} + SiLU; L2-norm q,k; decay g, write beta",
                      f"gated RMSNorm(o, z); state {m.n_v_heads}x{m.k_head_dim}x{m.v_head_dim} per layer"])


def mixer_label(cfg, mixer: str, causal: bool | None = None) -> str:
    """The label of one mixer kind (``mixer`` a MIXERS key)."""
    if mixer == "gated_delta":
        return gated_delta_label(cfg)
    return attention_label(cfg.replace(mixer=mixer, layer_mixers=()), causal)


def hybrid_label(cfg, causal: bool | None = None) -> str:
    """A scheduled mixer: the cycle, then each distinct mixer's label."""
    from llmarch.analysis.linear_costs import mixer_schedule

    parts = [f"mixer by layer: {mixer_schedule(cfg)}"]
    for m in cfg.mixers:
        parts.append(f"— {m}: " + mixer_label(cfg, m, causal))
    return "\n".join(parts)


def attention_label(cfg, causal: bool | None = None) -> str:
    causal = cfg.kind == "decoder" if causal is None else causal
    H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.dh
    if len(cfg.mixers) > 1:
        return hybrid_label(cfg, causal)
    if cfg.mixer == "gated_delta":
        return gated_delta_label(cfg)
    if cfg.mixer == "latent":
        m = cfg.mla
        q = "q from x" if m.q_lora_rank is None else f"q latent Rq={m.q_lora_rank}"
        lines = [f"{'causal ' if causal else ''}multi-head latent attention (MLA)",
                 f"H={H} heads; kv latent R={m.kv_lora_rank} + shared RoPE key Dr={m.qk_rope_head_dim}",
                 f"{q}; Dn={m.qk_nope_head_dim}, Dv={m.v_head_dim}; caches R + Dr per token",
                 _pattern_line(cfg)]
        return "\n".join(lines + _position_line(cfg, "the Dr part of q,k"))
    kind = "MHA" if G == H else "MQA" if G == 1 else "GQA"
    lines = [f"{'causal ' if causal else ''}self-attention, {kind}", f"H={H} q heads, G={G} kv heads, Dh={Dh}",
             _pattern_line(cfg)]
    if cfg.mixer == "longformer":
        lines.append("global rows: own q/k/v projection (qkv_global)")
    if cfg.mixer == "gated_attention":
        lines[0] += " + sigmoid output gate"
        lines.append(f"q,k {norm_label(cfg)} per head")
    return "\n".join(lines + _position_line(cfg, "q,k"))


def cross_label(cfg) -> str:
    H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.dh
    return f"cross-attention to the encoder output\nH={H} q heads, G={G} kv heads, Dh={Dh}; k/v cached per source token"


def _dense_label(kind: str, cfg, d_ff: int, bias: bool) -> str:
    b = " +bias" if bias else ""
    if kind == "mlp":
        return f"MLP ({cfg.activation}){b}\nD={cfg.d_model} -> F={d_ff} -> D"
    return f"{kind.upper()} ({cfg.activation}){b}\nD={cfg.d_model} -> 2x F={d_ff} (gate, up) -> D"


def ffn_label(cfg) -> tuple[str, str]:
    m = cfg.moe
    if m is None:
        return _dense_label(cfg.ffn, cfg, cfg.d_ff, cfg.ffn_bias), "ffn"
    lines = [f"MoE: {m.n_experts} experts ({m.expert_ffn}, F={m.expert_d_ff(cfg.d_ff)}), top-{m.top_k} router "
             f"({m.router})"]
    if m.n_shared:
        lines.append(f"+ {m.n_shared} shared expert(s), {shared_width(cfg)} wide{' (gated)' if m.shared_gate else ''}")
    if m.every > 1:
        lines.append(f"on layers i >= {m.first_dense} with i % {m.every} == {m.offset}; "
                     f"else dense {dense_kind(cfg)} F={cfg.d_ff}")
    elif m.first_dense:
        lines.append(f"from layer {m.first_dense} on; layers before: dense {dense_kind(cfg)} F={cfg.d_ff}")
    return "\n".join(lines), "moe"


NORM_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}


def norm_label(cfg) -> str:
    has_bias = cfg.norm == "layernorm" and cfg.norm_bias
    return NORM_NAMES.get(cfg.norm, cfg.norm) + (" +bias" if has_bias else "")


def _block(cfg, p: str, group: str, entry: str, causal: bool, cross: str | None, extra: str | None = None):
    """One block's nodes (ids prefixed ``p``), its residual edges, and the id of the node it ends in. ``cross``:
    the label of its cross module (None: none); ``extra``: a line added to the mixer's label."""
    ffn_text, ffn_kind = ffn_label(cfg)
    parts = [(Node(f"{p}attn", attention_label(cfg, causal) + (f"\n{extra}" if extra else ""), "attn", group),
              "1")]
    if cross:
        parts.append((Node(f"{p}cross", cross, "attn", group), "x"))
    parts.append((Node(f"{p}ffn", ffn_text, ffn_kind, group), "2"))
    nodes, residuals, prev = [], [], entry
    for sub, tag in parts:
        norm = Node(f"{p}norm{tag}", norm_label(cfg), "norm", group)
        add = Node(f"{p}add{tag}", "+", "add", group)
        if cfg.norm_placement == "pre":  # x + sub(norm(x))
            nodes += [norm, sub, add]
            residuals.append((prev, add.id))
            prev = add.id
        else:  # norm(x + sub(x))
            nodes += [sub, add, norm]
            residuals.append((prev, add.id))
            prev = norm.id
    return nodes, residuals


def _chain(nodes: list[Node]) -> list[tuple[str, str]]:
    return [(a.id, b.id) for a, b in zip(nodes, nodes[1:])]


def architecture(cfg, title: str = "") -> Diagram:
    """The graph of ``cfg``: embeddings, each stack's block (repeated L times) and final norm, the head."""
    specs = stacks(cfg)
    placement = f"{cfg.norm_placement}-norm"
    emb = f"token embedding\nV={cfg.vocab_size} x D={cfg.d_model}"
    if cfg.type_vocab_size:
        emb += f"\n+ {cfg.type_vocab_size} token type(s)"
    if cfg.position in ("learned", "sinusoidal", "sinusoidal_halves"):
        emb += f"\n+ {cfg.position} positions" + (f" ({cfg.max_seq_len} x D)" if cfg.position == "learned" else "")
    nodes, edges, residuals, groups = [], [], [], {}
    memory = None
    vision = getattr(cfg, "vision", None) is not None
    if vision:
        emb += embedding_line(cfg)
    for k, st in enumerate(specs):
        p = "" if len(specs) == 1 else st.name[:3] + "_"
        io = "input ids [B, T]" if len(specs) == 1 else \
            ("source ids [B, S]" if st.name == "encoder" else "target ids [B, T] (shifted right)")
        part = [Node(f"{p}ids", io, "io"),
                Node(f"{p}emb", emb + ("\n(shared with the encoder)" if k else ""), "embed")]
        if cfg.embed_norm:
            part.append(Node(f"{p}emb_norm", f"embedding {norm_label(cfg)}", "norm"))
        group = "block" if len(specs) == 1 else st.name
        groups[group] = (f"{st.name} " if len(specs) > 1 else "") + f"{block_count(cfg, st.n_layers)} ({placement})"
        cross = cross_label(cfg) if st.cross else image_cross_label(cfg) if vision else None
        block, res = _block(cfg, p, group, part[-1].id, st.causal, cross, joint_line(cfg) if vision else None)
        part += block
        if cfg.final_norm:
            part.append(Node(f"{p}final_norm", f"final {norm_label(cfg)}", "norm"))
        nodes += part
        edges += _chain(part)
        residuals += res
        if st.cross and memory is not None:
            edges.append((memory, f"{p}cross"))
        memory = part[-1].id
    if vision:  # the tower and projector beside the decoder
        side, side_edges = vision_graph(cfg, nodes)
        nodes += side
        edges += side_edges
    head, head_edges = head_graph(cfg, [n for n in nodes if n.beside is None][-1].id)
    nodes += head
    edges += head_edges
    schedule = [cfg.layer_mixer(i) for i in range(specs[-1].n_layers)] if len(cfg.mixers) > 1 else []
    return Diagram(title or "model", nodes, edges, residuals, groups, schedule=schedule)


def head_graph(cfg, entry: str) -> tuple[list[Node], list[tuple[str, str]]]:
    """The head's nodes (ending in the output) and edges from ``entry``, the final hidden states. BERT's
    pre-training heads are parallel: MLM on every position, the pooler and next-sentence head on the first."""
    V, tied = cfg.vocab_size, " (tied to embedding)" if cfg.tie_embeddings else ""
    if cfg.head == "classification":
        nodes = [Node("pooler", "pooler: first position, dense D -> D, tanh", "head"),
                 Node("head", f"classifier D -> {cfg.n_labels} labels", "head"),
                 Node("logits", "logits [B, n_labels]", "io")]
    elif cfg.head in ("mlm", "pretraining"):
        nodes = [Node("head_transform", f"MLM transform: dense D -> D, {cfg.activation}, {norm_label(cfg)}", "head"),
                 Node("head", f"MLM decoder D -> V={V}{tied} +bias", "head"),
                 Node("logits", "MLM logits [B, T, V]\n(every position)", "io")]
        if cfg.head == "pretraining":  # a second branch beside the MLM one, from the same hidden states
            nsp = [Node("pooler", "pooler on the first position\n([CLS]): dense D -> D, tanh", "head",
                        beside="head_transform"),
                   Node("nsp", "next-sentence head D -> 2", "head", beside="head"),
                   Node("nsp_logits", "NSP logits [B, 2]", "io", beside="logits")]
            return nodes + nsp, _chain([Node(entry, "", "io")] + nodes) + _chain([Node(entry, "", "io")] + nsp)
    else:
        head = f"LM head D -> V={V}{tied}" + (" +bias" if cfg.head_bias else "")
        nodes = [Node("head", head, "head"), Node("logits", "logits [B, T, V]", "io")]
    return nodes, _chain([Node(entry, "", "io")] + nodes)


def _mermaid_text(label: str) -> str:
    return label.replace('"', "#quot;").replace("\n", "<br/>")


MERMAID_STYLE = {"io": "fill:#eeeeee,stroke:#777", "embed": "fill:#d6e9f8,stroke:#3a7bbf",
                 "norm": "fill:#fff4c2,stroke:#b59b00", "attn": "fill:#f8d7d3,stroke:#c0392b",
                 "ffn": "fill:#d8f0d8,stroke:#2e8b57", "moe": "fill:#e6dcf5,stroke:#6a3d9a",
                 "add": "fill:#ffffff,stroke:#333", "head": "fill:#d6e9f8,stroke:#3a7bbf"}


def to_mermaid(d: Diagram) -> str:
    """Mermaid ``flowchart`` text: each block is a subgraph, residuals are dotted edges."""
    lines = ["---", f"title: {d.title}", "---", "flowchart TB"]

    def node(n: Node) -> str:
        shape = ('(("', '"))') if n.kind == "add" else ('["', '"]')
        return f'  {n.id}{shape[0]}{_mermaid_text(n.label)}{shape[1]}:::{n.kind}'

    lines += [node(n) for n in d.nodes if not n.in_block]
    for group, label in d.groups.items():
        lines.append(f'  subgraph {group}["{_mermaid_text(label)}"]')
        lines += ["  " + node(n) for n in d.nodes if n.group == group]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in d.edges]
    lines += [f"  {a} -. residual .-> {b}" for a, b in d.residuals]
    lines += [f"  classDef {k} {v}" for k, v in MERMAID_STYLE.items()]
    lines += [f"  %% {note}" for note in d.notes]
    if d.schedule:
        lines.append("  %% layer schedule: " + " ".join(d.schedule))
    return "\n".join(lines) + "\n"
