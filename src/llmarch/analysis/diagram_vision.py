"""The image side of a vision-language diagram, drawn beside the decoder: the ViT tower (beside the input ids; a
tiled tower with its tiles, local and gated global blocks) and the projector (beside the token embedding), with an
edge to where the features enter the text: the embeddings' image-token slots (projector), the gated
cross-attention of the scheduled blocks (cross_attention), the gated cross-attention block that replaces the
scheduled layers (cross_blocks, drawn beside the block's self-attention), or the scheduled blocks'
self-attention (joint)."""
from __future__ import annotations


def _list(layers) -> str:
    return ",".join(map(str, layers))


def _layers(v) -> str:
    return _list(v.cross_layers)


def _layer_word(v) -> str:
    """'layer 1' or 'layers 1,3'."""
    return ("layer " if len(v.cross_layers) == 1 else "layers ") + _layers(v)


def layers_read(v) -> str:
    return "+".join(map(str, v.feature_layers)) + " concatenated" if v.feature_layers else str(v.feature_layer)


def tower_label(v) -> str:
    extra = " + class token" if v.class_token else ""
    read = f"reads hidden state {layers_read(v)} ({v.feature_select})"
    if v.positions != "gated_tiles":
        return "\n".join([f"ViT tower: pixel_values [n, {v.channels}, {v.image_size}, {v.image_size}]",
                          f"{v.patch_size}x{v.patch_size} patch conv{extra}, {v.n_positions} positions",
                          f"{v.n_layers} x encoder block D={v.d_model} H={v.n_heads} F={v.d_ff}", read,
                          f"-> N={v.image_tokens} features per image"])
    padded = -(-v.n_positions // v.pad_to) * v.pad_to
    if v.intermediate_layers:
        read = f"reads state {layers_read(v)} ({v.feature_select}) + intermediate {_list(v.intermediate_layers)}"
    return "\n".join([f"tiled ViT: [n, {v.max_num_tiles} tiles, {v.channels}, {v.image_size}, {v.image_size}]",
                      f"{v.patch_size}x{v.patch_size} patch conv{extra} per tile; gated",
                      f"tile positions by aspect ratio; {v.n_positions} -> {padded} per tile",
                      f"{v.n_layers} local + {v.global_layers} gated global blocks",
                      f"D={v.d_model} H={v.n_heads} F={v.d_ff}, all tiles in one sequence",
                      read,
                      f"-> N={v.image_tokens} features ({v.max_num_tiles} tiles x {v.tile_tokens}) per image"])


def projector_label(cfg) -> str:
    v = cfg.vision
    into = {"projector": f"-> the image-token slots (id {v.image_token_id})",
            "cross_attention": f"-> normed: k/v of gated cross-attn ({_layers(v)})",
            "cross_blocks": f"-> k/v of the cross blocks\n({_layer_word(v)})",
            "joint": f"-> image prefix of the text in {_layer_word(v)}"}.get(v.fusion, v.fusion)
    if v.projector == "linear":
        return "\n".join([f"projector: Linear {v.feature_dim}->{cfg.d_model}", into])
    return "\n".join([f"projector: Linear {v.feature_dim}->{cfg.d_model}, {v.projector_activation},",
                      f"Linear {cfg.d_model}->{cfg.d_model}", into])


def cross_block_label(cfg) -> str:
    """The gated cross-attention block that takes the place of the scheduled layers (cross_blocks)."""
    from llmarch.analysis.diagram import norm_label

    v, norm = cfg.vision, norm_label(cfg)
    return "\n".join(["cross block, in place of decoder", f"{_layer_word(v)} (of {cfg.n_layers})",
                      f"{norm} -> cross-attn to N={v.image_tokens} image",
                      f"tokens, H={cfg.n_heads} G={cfg.kv_heads}, q/k {norm} per head",
                      "x tanh(attn gate) (starts at 0), + residual",
                      f"{norm} -> {cfg.ffn.upper()} x tanh(ffn gate), + residual",
                      "cross_attention_mask: tiles per token",
                      "no image in context: block skipped"])


def embedding_line(cfg) -> str:
    """What the token embedding's label gains (the projector fusion fills its image-token slots)."""
    return "\nimage-token slots <- projected image features" if cfg.vision.fusion == "projector" else ""


def image_cross_label(cfg) -> str | None:
    """The cross module of a decoder block that cross-attends to the image (None: the fusion has none)."""
    v = cfg.vision
    if v is None or v.fusion != "cross_attention":
        return None
    return "\n".join([f"tanh-gated cross-attention to the {v.image_tokens} image features",
                      f"only in {_layer_word(v)} (gate starts at 0); H={cfg.n_heads}, G={cfg.kv_heads}",
                      "k/v projected once per image (cached)"])


def joint_line(cfg) -> str | None:
    """A line for the self-attention label of a joint model."""
    v = cfg.vision
    if v is None or v.fusion != "joint":
        return None
    return f"{_layer_word(v)}: keys [N={v.image_tokens} image; text], images bidirectional"


def vision_graph(cfg, nodes) -> tuple[list, list[tuple[str, str]]]:
    """(side nodes, edges) for ``cfg.vision``; ``nodes`` are the decoder's (ids, emb first)."""
    from llmarch.analysis.diagram import Node

    ids, emb = nodes[0].id, nodes[1].id
    side = [Node("vision_tower", tower_label(cfg.vision), "embed", beside=ids),
            Node("projector", projector_label(cfg), "ffn", beside=emb)]
    if cfg.vision.fusion == "cross_blocks":
        side.append(Node("cross_block", cross_block_label(cfg), "attn", beside="attn"))
    target = {"projector": emb, "cross_attention": "cross", "cross_blocks": "cross_block",
              "joint": "attn"}[cfg.vision.fusion]
    return side, [("vision_tower", "projector"), ("projector", target)]


def block_count(cfg, n_layers: int) -> str:
    """The repeated block's count: the layers a fusion replaces are drawn beside it, not counted in it."""
    v = getattr(cfg, "vision", None)
    replaced = len(v.cross_layers) if v is not None and v.fusion == "cross_blocks" else 0
    return f"block x {n_layers - replaced}"


__all__ = ["block_count", "cross_block_label", "embedding_line", "image_cross_label", "joint_line", "projector_label",
           "tower_label", "vision_graph"]
