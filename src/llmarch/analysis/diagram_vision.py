"""The image side of a vision-language diagram, drawn beside the decoder: the ViT tower (beside the input ids) and
the projector (beside the token embedding), with an edge to where the features enter the text: the embeddings'
image-token slots (projector), the gated cross-attention of the scheduled blocks (cross_attention), or the
scheduled blocks' self-attention (joint)."""
from __future__ import annotations


def _layers(v) -> str:
    return ",".join(map(str, v.cross_layers))


def layers_read(v) -> str:
    return "+".join(map(str, v.feature_layers)) + " concatenated" if v.feature_layers else str(v.feature_layer)


def tower_label(v) -> str:
    extra = " + class token" if v.class_token else ""
    return "\n".join([f"ViT tower: pixel_values [n, {v.channels}, {v.image_size}, {v.image_size}]",
                      f"{v.patch_size}x{v.patch_size} patch conv{extra}, {v.n_positions} positions",
                      f"{v.n_layers} x encoder block D={v.d_model} H={v.n_heads} F={v.d_ff}",
                      f"reads hidden state {layers_read(v)} ({v.feature_select})",
                      f"-> N={v.image_tokens} features per image"])


def projector_label(cfg) -> str:
    v = cfg.vision
    into = {"projector": f"-> the image-token slots (id {v.image_token_id})",
            "cross_attention": f"-> normed: k/v of gated cross-attn ({_layers(v)})",
            "joint": f"-> image prefix of the text in layers {_layers(v)}"}.get(v.fusion, v.fusion)
    return "\n".join([f"projector: Linear {v.feature_dim}->{cfg.d_model}, {v.projector_activation},",
                      f"Linear {cfg.d_model}->{cfg.d_model}", into])


def embedding_line(cfg) -> str:
    """What the token embedding's label gains (the projector fusion fills its image-token slots)."""
    return "\nimage-token slots <- projected image features" if cfg.vision.fusion == "projector" else ""


def image_cross_label(cfg) -> str | None:
    """The cross module of a decoder block that cross-attends to the image (None: the fusion has none)."""
    v = cfg.vision
    if v is None or v.fusion != "cross_attention":
        return None
    return "\n".join([f"tanh-gated cross-attention to the {v.image_tokens} image features",
                      f"only in layers {_layers(v)} (gate starts at 0); H={cfg.n_heads}, G={cfg.kv_heads}",
                      "k/v projected once per image (cached)"])


def joint_line(cfg) -> str | None:
    """A line for the self-attention label of a joint model."""
    v = cfg.vision
    if v is None or v.fusion != "joint":
        return None
    return f"layers {_layers(v)}: keys [N={v.image_tokens} image; text], images bidirectional"


def vision_graph(cfg, nodes) -> tuple[list, list[tuple[str, str]]]:
    """(side nodes, edges) for ``cfg.vision``; ``nodes`` are the decoder's (ids, emb first)."""
    from llmarch.analysis.diagram import Node

    ids, emb = nodes[0].id, nodes[1].id
    side = [Node("vision_tower", tower_label(cfg.vision), "embed", beside=ids),
            Node("projector", projector_label(cfg), "ffn", beside=emb)]
    target = {"projector": emb, "cross_attention": "cross", "joint": "attn"}.get(cfg.vision.fusion, emb)
    return side, [("vision_tower", "projector"), ("projector", target)]


__all__ = ["embedding_line", "image_cross_label", "joint_line", "projector_label", "tower_label", "vision_graph"]
