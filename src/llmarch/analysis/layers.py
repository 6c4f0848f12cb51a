"""What one layer of each kind costs, read from the config: the stacks a model has, norms, the token mixer of each
``mixer`` value (parameters, matmul multiply-adds, cache numbers) and the cross-attention of an encoder-decoder.

One small class per mixer in :data:`MIXER_COSTS`, keyed like ``llmarch.nn.mixers.MIXERS``; a mixer added there
without an entry here raises a ValueError naming this file. Multiply-adds (MACs) are split into the projections
(per token) and the score/value products (per (query, key) pair), so callers scale them by T and T·S.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StackSpec:
    """One stack of blocks: its name, depth, whether its queries are causal and whether its blocks cross-attend."""

    name: str
    n_layers: int
    causal: bool
    cross: bool


def stacks(cfg) -> list[StackSpec]:
    """The stacks ``llmarch.build`` makes: decoder, encoder, or encoder then decoder (with cross-attention)."""
    if cfg.kind == "decoder":
        return [StackSpec("decoder", cfg.n_layers, True, False)]
    if cfg.kind == "encoder":
        return [StackSpec("encoder", cfg.n_layers, False, False)]
    return [StackSpec("encoder", cfg.n_layers, False, False),
            StackSpec("decoder", cfg.n_decoder_layers or cfg.n_layers, True, True)]


def norm_params(cfg, dim: int | None = None) -> int:
    """One norm layer: a gain vector, plus a bias for LayerNorm with ``norm_bias``."""
    dim = dim or cfg.d_model
    if cfg.norm == "layernorm":
        return dim * (2 if cfg.norm_bias else 1)
    return dim  # rmsnorm and gain-only norms


class AttentionCost:
    """MHA / GQA / MQA: q [D -> H·Dh], k and v [D -> G·Dh] (one fused qkv matrix), o [H·Dh -> D]."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        D, H, G, Dh, qb = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.qkv_bias
        return {"attn_q": D * H * Dh + (H * Dh if qb else 0), "attn_k": D * G * Dh + (G * Dh if qb else 0),
                "attn_v": D * G * Dh + (G * Dh if qb else 0), "attn_o": H * Dh * D + (D if cfg.out_bias else 0)}

    @staticmethod
    def proj_macs(cfg) -> int:
        """Per token: D·(H + 2G)·Dh + H·Dh·D."""
        return cfg.d_model * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh + cfg.n_heads * cfg.dh * cfg.d_model

    @staticmethod
    def pair_macs(cfg) -> int:
        """Per (query, key) pair: q·k (H·Dh) and p·v (H·Dh)."""
        return 2 * cfg.n_heads * cfg.dh

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        """Numbers cached per token per layer: k and v, 2·G·Dh."""
        return 2 * cfg.kv_heads * cfg.dh

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        """One new token against ``keys`` cached keys."""
        return cls.proj_macs(cfg) + keys * cls.pair_macs(cfg)

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        return 0

    @classmethod
    def mixing_macs(cls, cfg, batch: int, T: int) -> int:
        """Sequence mixing of T tokens without a cache: every (query, key) pair of the dense score matrix."""
        return batch * T * T * cls.pair_macs(cfg)

    @staticmethod
    def state_bytes(cfg, dtype_bytes: float) -> float:
        """A fixed-size decoding state per layer (recurrent mixers); attention keeps none."""
        return 0.0


class LongformerCost(AttentionCost):
    """Attention plus a second projection ``qkv_global`` [D -> (H + 2G)·Dh] for the global rows (Longformer).
    It runs over all T tokens when any global token exists; each global row then attends every key. Only the
    config's ``sparse.global_tokens`` are known here (a batch may add more through ``global_attention_mask``).
    The mixer keeps no incremental cache."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        width = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh
        return {**AttentionCost.params(cfg), "attn_global": cfg.d_model * width + (width if cfg.qkv_bias else 0)}

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        return None

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        n_global = sum(1 for t in cfg.sparse.global_tokens if t < T)
        if not n_global:
            return 0
        width = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh
        return batch * T * cfg.d_model * width + batch * n_global * T * 2 * cfg.n_heads * cfg.dh


class LatentCost(AttentionCost):
    """Multi-head latent attention (DeepSeek-V2): q from x (D -> H·(Dn + Dr)) or through a q latent
    (D -> Rq, RMSNorm, Rq -> H·(Dn + Dr)); kv_a D -> R + Dr (the latent and the shared RoPE key); the latent
    RMSNorm; kv_b R -> H·(Dn + Dv); o H·Dv -> D. Costs are those of the naive (expanded) path; decoding with a
    cache uses the absorbed path unless ``mla.absorb`` is never."""

    @staticmethod
    def widths(cfg) -> tuple[int, int]:
        """(0, o input width H·Dv): what the projections' outputs leave saved is in :meth:`saved_bytes`."""
        return 0, cfg.n_heads * cfg.mla.v_head_dim

    @staticmethod
    def saved_bytes(cfg, a: float, seq_len: int) -> float:
        """Per token, what the naive path saves beyond x and the o input: the q latent's RMSNorm and the up
        projection's input; the kv latent's RMSNorm (its fp32 input is the whole [R + Dr] projection in fp32)
        and kv_b's input; q and k concatenated from their no-pe and rotated parts (a·H·(Dn + Dr) each); then
        SDPA: with Dv = Dn + Dr the fused kernel's v (kv_b's output), output and fp32 log-sum-exp; otherwise
        (CPU SDPA falls back to its math path) the softmax over the T keys and a copy of v (a·H·Dv)."""
        m, H = cfg.mla, cfg.n_heads
        R, Rq, Dn, Dr, Dv = m.kv_lora_rank, m.q_lora_rank or 0, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        q = 4 * Rq + 4 + 2 * a * Rq if Rq else 0
        kv = (4 * (R + Dr) if a == 4 else 4 * R) + 4 + 2 * a * R
        if Dv == Dn + Dr:
            attend = a * H * (Dn + Dv) + a * H * Dv + 4 * H
        else:
            attend = a * H * seq_len + a * H * Dv
        return q + kv + 2 * a * H * (Dn + Dr) + attend

    @staticmethod
    def params(cfg) -> dict[str, int]:
        m, D, H, qb = cfg.mla, cfg.d_model, cfg.n_heads, cfg.qkv_bias
        R, Rq, Dn, Dr, Dv = m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        q = D * H * (Dn + Dr) if Rq is None else D * Rq + (Rq if qb else 0) + Rq * H * (Dn + Dr)
        return {"attn_q": q, "attn_kv_a": D * (R + Dr) + (R + Dr if qb else 0),
                "attn_latent_norms": R + (Rq or 0), "attn_kv_b": R * H * (Dn + Dv),
                "attn_o": H * Dv * D + (D if cfg.out_bias else 0)}

    @staticmethod
    def _q_macs(cfg) -> int:
        m, D, H = cfg.mla, cfg.d_model, cfg.n_heads
        width = H * m.qk_head_dim
        return D * width if m.q_lora_rank is None else D * m.q_lora_rank + m.q_lora_rank * width

    @classmethod
    def proj_macs(cls, cfg) -> int:
        """q path + kv_a + kv_b (every token's latent expanded) + o."""
        m, D, H = cfg.mla, cfg.d_model, cfg.n_heads
        R, Dr, Dn, Dv = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        return cls._q_macs(cfg) + D * (R + Dr) + R * H * (Dn + Dv) + H * Dv * D

    @staticmethod
    def pair_macs(cfg) -> int:
        return cfg.n_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        """The normalised latent (R) and the rotated shared RoPE key (Dr)."""
        return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        m, D, H = cfg.mla, cfg.d_model, cfg.n_heads
        R, Dr, Dn, Dv = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        fixed = cls._q_macs(cfg) + D * (R + Dr) + H * Dv * D
        if m.absorb == "never":  # every cached latent is expanded again
            return fixed + keys * (R * H * (Dn + Dv) + cls.pair_macs(cfg))
        # absorbed: q_nope·W_UK [H·Dn·R], scores over [R | Dr], values over R, then W_UV [H·R·Dv]
        return fixed + H * Dn * R + keys * H * (2 * R + Dr) + H * R * Dv


MIXER_COSTS = {"attention": AttentionCost, "longformer": LongformerCost, "latent": LatentCost}


def mixer_cost(cfg, layer: int | None = None):
    """The cost class of layer ``layer``'s mixer (``layer_mixers`` schedule), or of ``cfg.mixer`` when None."""
    name = cfg.mixer if layer is None else cfg.layer_mixer(layer)
    if name not in MIXER_COSTS:
        raise ValueError(f"mixer: the analysis does not know the cost of {name!r}; add a class to "
                         "llmarch/analysis/layers.py MIXER_COSTS")
    return MIXER_COSTS[name]


def replaced_layers(cfg) -> frozenset[int]:
    """Decoder layers whose token mixer a fusion replaces (``cross_blocks``: a gated cross-attention block reads
    the image instead of the text; its FFN stays): no self-attention work or cache there; what they spend on the
    image is in :func:`~llmarch.analysis.vision.text_image_macs`."""
    v = getattr(cfg, "vision", None)
    return frozenset(v.cross_layers) if v is not None and v.fusion == "cross_blocks" else frozenset()


class CrossAttentionCost:
    """Cross-attention of a decoder block: q [D -> H·Dh] on the decoder tokens, kv [D -> 2·G·Dh] on the encoder
    output (once per source token), o [H·Dh -> D]."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        D, H, G, Dh, qb = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.qkv_bias
        return {"cross_q": D * H * Dh + (H * Dh if qb else 0), "cross_kv": D * 2 * G * Dh + (2 * G * Dh if qb else 0),
                "cross_o": H * Dh * D + (D if cfg.out_bias else 0)}

    @staticmethod
    def target_macs(cfg) -> int:
        """Per decoder token: q and o."""
        return 2 * cfg.d_model * cfg.n_heads * cfg.dh

    @staticmethod
    def source_macs(cfg) -> int:
        """Per source token: the k/v projection."""
        return cfg.d_model * 2 * cfg.kv_heads * cfg.dh

    @staticmethod
    def pair_macs(cfg) -> int:
        return 2 * cfg.n_heads * cfg.dh

    @staticmethod
    def cache_numbers(cfg) -> int:
        """Per source token and decoder layer: k and v, 2·G·Dh."""
        return 2 * cfg.kv_heads * cfg.dh


from llmarch.analysis import linear_costs  # noqa: E402,F401  (adds the hybrid mixers' costs to MIXER_COSTS)
