"""Costs of the hybrid models' mixers, registered in :data:`llmarch.analysis.layers.MIXER_COSTS`: gated attention
(attention + an output-gate projection + per-head q/k norms) and the gated delta rule (linear in length, a constant
state per layer instead of a per-token cache).

Gated delta, chunked form with chunk C over Tp = ceil(T / C)·C slots, per sequence and v head: per chunk the
matmuls k_β·kᵀ and q·kᵀ (C²·Dk each), scores·u (C²·Dv), and the state reads and write w·S, q·S, kᵀ·u (C·Dk·Dv each)
— the ops ``torch.utils.flop_counter`` counts. Not counted (here or by the counter): the two unit-triangular solves
(≈ C²·(Dk + Dv)/2 multiply-adds per chunk), L2 norms, gates and the gated RMSNorm. Decoding one token: the
projections, the K-tap convolution and 3·Dk·Dv per v head (read, write, output; elementwise ops)."""
from __future__ import annotations

import math

from llmarch.analysis.layers import MIXER_COSTS, AttentionCost, norm_params


class GatedAttentionCost(AttentionCost):
    """Attention whose q projection is doubled (the second half is a sigmoid gate on the heads' output) and whose
    q and k are normalised per head (two norms over Dh)."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        H, Dh = cfg.n_heads, cfg.dh
        return {**AttentionCost.params(cfg), "attn_gate": cfg.d_model * H * Dh + (H * Dh if cfg.qkv_bias else 0),
                "attn_qk_norms": 2 * norm_params(cfg, Dh)}

    @staticmethod
    def proj_macs(cfg) -> int:
        return AttentionCost.proj_macs(cfg) + cfg.d_model * cfg.n_heads * cfg.dh


class GatedDeltaCost:
    """Gated delta rule layer: qkvz + ba in-projections, a depthwise conv over q|k|v, A_log and dt_bias, the gated
    RMSNorm (Dv) and the out projection; no per-token cache, a constant state (:meth:`state_bytes`)."""

    @staticmethod
    def params(cfg) -> dict[str, int]:
        m, D = cfg.linear, cfg.d_model
        return {"delta_in": D * (2 * m.n_k_heads * m.k_head_dim + 2 * m.n_v_heads * m.v_head_dim + 2 * m.n_v_heads),
                "delta_conv": m.conv_channels * m.conv_kernel, "delta_gates": 2 * m.n_v_heads,
                "delta_norm": m.v_head_dim, "delta_out": m.n_v_heads * m.v_head_dim * D}

    @staticmethod
    def proj_macs(cfg) -> int:
        """Per token: in-projections, the K conv taps per channel, the out projection."""
        p = GatedDeltaCost.params(cfg)
        return p["delta_in"] + p["delta_conv"] + p["delta_out"]

    @staticmethod
    def pair_macs(cfg) -> int:
        return 0  # no (query, key) score matrix over the whole context

    @staticmethod
    def mixing_macs(cfg, batch: int, T: int) -> int:
        """The chunked rule over T tokens (see the module docstring)."""
        m = cfg.linear
        C, Dk, Dv = m.chunk_size, m.k_head_dim, m.v_head_dim
        per_chunk = C * C * (2 * Dk + Dv) + 3 * C * Dk * Dv
        return batch * m.n_v_heads * math.ceil(T / C) * per_chunk

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        return None  # nothing grows with the context

    @staticmethod
    def state_bytes(cfg, dtype_bytes: float) -> float:
        """One layer's decoding state: the delta-rule state Hv·Dk·Dv (kept in fp32) + the conv window C·(K-1)."""
        m = cfg.linear
        return 4.0 * m.n_v_heads * m.k_head_dim * m.v_head_dim + dtype_bytes * m.conv_channels * (m.conv_kernel - 1)

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        m = cfg.linear
        return cls.proj_macs(cfg) + 3 * m.n_v_heads * m.k_head_dim * m.v_head_dim

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        return 0

    @staticmethod
    def widths(cfg) -> tuple[int, int]:
        """(in-projection output width, out-projection input width) per token, for the activation count."""
        m = cfg.linear
        return 2 * m.n_k_heads * m.k_head_dim + 2 * m.n_v_heads * m.v_head_dim + 2 * m.n_v_heads, \
            m.n_v_heads * m.v_head_dim


def mixer_schedule(cfg) -> str:
    """A hybrid's layer schedule, e.g. "gated_delta×3 + gated_attention (×12)"; "" for one mixer everywhere."""
    if len(cfg.mixers) < 2:
        return ""
    runs, cycle = [], cfg.layer_mixers
    for m in cycle:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return " + ".join(f"{m}×{n}" if n > 1 else m for m, n in runs) + f" (×{cfg.n_layers // len(cycle)})"


MIXER_COSTS.update(gated_attention=GatedAttentionCost, gated_delta=GatedDeltaCost)
