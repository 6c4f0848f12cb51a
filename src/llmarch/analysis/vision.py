"""Parameters and FLOPs of the image side, from the config alone: the ViT tower (tiled or not), the projector,
gated cross-attention layers, cross blocks and joint layers; the image tokens an image puts in the context; and what the text tokens
spend reading the image (added to the text FLOPs of :func:`~llmarch.analysis.flops.forward_flops`). Held to the
meta-built model by tests (parameters exactly; FLOPs against ``torch.utils.flop_counter`` on a real forward)."""
from __future__ import annotations

from llmarch.analysis.ffn import dense_ffn_params
from llmarch.vision_config import VisionConfig


def tile_positions(v: VisionConfig) -> int:
    """Tiled towers' position parameters: the table and its gate, the per-tile table and the pre/post tile
    embeddings (one row per aspect-ratio id, 0 included) with their gates."""
    if v.positions != "gated_tiles":
        return v.n_positions * v.d_model
    from llmarch.nn.vision.tiles import aspect_ratios

    ids, tiles, N, D = len(aspect_ratios(v.max_num_tiles)) + 1, v.max_num_tiles, v.n_positions, v.d_model
    return N * D + 1 + ids * tiles * N * D + 2 * (ids * tiles * D + 1)


def tower_params(v: VisionConfig) -> dict[str, int]:
    """Parameters of a VisionTower by part."""
    D, F, C, P = v.d_model, v.d_ff, v.channels, v.patch_size
    ln = 2 * D
    bias = 4 * D if v.attn_bias else 0
    block = 4 * D * D + bias + dense_ffn_params(D, F, "mlp", True) + 2 * ln
    pool = {"class_token": 0, "none": 0,
            "attention": D + (3 * D * D + 3 * D) + (D * D + D) + ln + dense_ffn_params(D, F, "mlp", True)}[v.pool]
    return {"patch_embed": C * P * P * D + (D if v.patch_bias else 0) + (D if v.class_token else 0),
            "positions": tile_positions(v), "pre_norm": ln if v.pre_norm else 0,
            "blocks": v.n_layers * block + v.global_layers * (block + 2),  # + the global blocks' two gates
            "post_norm": ln if v.post_norm != "none" else 0, "pool": pool}


def projector_params(v: VisionConfig, D: int) -> int:
    """mlp: feature_dim -> D -> D; linear: feature_dim -> D (with biases if ``projector_bias``)."""
    if v.projector == "linear":
        return v.feature_dim * D + (D if v.projector_bias else 0)
    return v.feature_dim * D + D * D + (2 * D if v.projector_bias else 0)


def fusion_params(cfg) -> dict[str, int]:
    """The image side of a ModelConfig with ``vision``: tower, projector, gated cross-attention layers."""
    v, D = cfg.vision, cfg.d_model
    H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.dh
    projector = projector_params(v, D)
    cross = 0
    if v.fusion == "cross_blocks":  # a replaced layer's q/kv/out, norms and FFN are counted as the layer's own
        cross = len(v.cross_layers) * (2 * Dh + 2)  # + the q/k norms and the two gates
    if v.fusion == "cross_attention":
        one = D * H * Dh + 2 * D * G * Dh + H * Dh * D + (H * Dh + 2 * G * Dh if cfg.qkv_bias else 0)
        one += (D if cfg.out_bias else 0) + 1  # + the gate
        norm = D * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
        cross = len(v.cross_layers) * (one + norm) + norm  # + the norm on the features
    return {"vision": sum(tower_params(v).values()), "projector": projector, "image_cross": cross}


def tower_flops(v: VisionConfig, images: int = 1, depth: int | None = None) -> int:
    """Matmul FLOPs of the tower for ``images`` images at ``image_size`` (2 per multiply-add; the patch
    convolution counts as a matmul), through ``depth`` blocks (default all, with the pooling head). A tiled tower
    runs every tile, its tokens padded to ``pad_to``, in one sequence."""
    D, F, tiles = v.d_model, v.d_ff, v.max_num_tiles
    N = tiles * -(-v.n_positions // v.pad_to) * v.pad_to  # tokens the blocks see
    patches = tiles * v.grid ** 2
    conv = 2 * patches * v.channels * v.patch_size ** 2 * D
    block = 2 * N * (4 * D * D + 2 * D * F) + 4 * N * N * D  # projections + MLP, then q·kᵀ and probs·v
    layers = v.n_layers + v.global_layers if depth is None else depth
    pool = 0
    if v.pool == "attention" and depth is None:
        pool = 2 * (D * D + 2 * N * D * D + D * D + 2 * D * F) + 4 * N * D
    return images * (conv + layers * block + pool)


def image_flops(cfg, images: int = 1) -> dict[str, int]:
    """FLOPs a vision-language model spends per forward on ``images`` images: the tower up to the feature layer,
    the projector, and the image side of the fusion layers (``image_layers``: the k/v projection of the N
    features in each cross-attention layer or cross block, or the N image positions through each joint layer: projections, FFN
    and N x N scores). What the text tokens spend reading the image is :func:`text_image_macs`."""
    v = cfg.vision
    n = v.image_tokens
    D = cfg.d_model
    weights = v.feature_dim * D + (D * D if v.projector == "mlp" else 0)  # the projector's matrices
    return {"vision": tower_flops(v, images, v.feature_depth), "projector": images * 2 * n * weights,
            "image_layers": images * 2 * image_layer_macs(cfg)}


def image_layer_macs(cfg) -> int:
    """Multiply-adds of one image's N features in the fusion layers (0 for the projector fusion, whose image
    tokens are text positions)."""
    from llmarch.analysis.flops import ffn_macs_per_token
    from llmarch.analysis.layers import CrossAttentionCost, mixer_cost

    v, N = cfg.vision, cfg.vision.image_tokens
    if v.fusion in ("cross_attention", "cross_blocks"):
        return len(v.cross_layers) * N * CrossAttentionCost.source_macs(cfg)
    if v.fusion == "joint":
        return sum(N * (mixer_cost(cfg, i).proj_macs(cfg) + ffn_macs_per_token(cfg, i))
                   + N * N * mixer_cost(cfg, i).pair_macs(cfg) for i in v.cross_layers)
    return 0


def text_image_macs(cfg) -> tuple[int, int]:
    """(linear, attention) multiply-adds per text token for reading its row's image: a gated cross-attention
    layer's (or cross block's) q and o projections and N (query, image key) pairs, N the image's tokens over all
    its tiles; a joint layer's N extra keys. 0 for the projector (its image tokens are already among the text
    positions). A cross block replaces its layer's self-attention (``flops.replaced_layers``): the text stack
    counts only its FFN there. All assume an image in the context (without one, cross blocks are skipped)."""
    from llmarch.analysis.layers import CrossAttentionCost, mixer_cost

    v, N = cfg.vision, cfg.vision.image_tokens
    if v.fusion in ("cross_attention", "cross_blocks"):
        layers = len(v.cross_layers)
        return layers * CrossAttentionCost.target_macs(cfg), layers * N * CrossAttentionCost.pair_macs(cfg)
    if v.fusion == "joint":
        return 0, sum(N * mixer_cost(cfg, i).pair_macs(cfg) for i in v.cross_layers)
    return 0, 0


def image_summary(cfg) -> dict:
    """What `llmarch inspect` shows for the image side: per-part parameters, image tokens and FLOPs per image
    (``cfg`` a VisionConfig alone, or a ModelConfig with ``vision``)."""
    if isinstance(cfg, VisionConfig):
        return {"params": tower_params(cfg), "image_tokens": cfg.n_positions, "flops_per_image": tower_flops(cfg)}
    from llmarch.nn.vision import FUSIONS

    v = cfg.vision
    # joint: N image slots in the KV cache; others: the image tokens of the text (cross-attention: none)
    tokens = v.image_tokens if v.fusion == "joint" else FUSIONS[v.fusion].text_tokens(v)
    return {"params": fusion_params(cfg), "image_tokens": tokens, "image_features": v.image_tokens,
            "flops_per_image": image_flops(cfg)}


__all__ = ["fusion_params", "image_flops", "image_layer_macs", "image_summary", "text_image_macs", "tower_flops",
           "tower_params"]
