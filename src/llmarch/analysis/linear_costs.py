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

    @staticmethod
    def widths(cfg) -> tuple[int, int]:
        """(q|gate|k|v projection output width, out projection input width) per token."""
        return (2 * cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh, cfg.n_heads * cfg.dh

    @staticmethod
    def saved_bytes(cfg, a: float, seq_len: int) -> float:
        """Per token, beyond the projections' inputs and outputs (fp32 as measured): the q and k norms' 1/rms
        and normalised output (4·(H+G)·(Dh+1); their input is a view of the projection), the rotated q|k when
        RoPE rotates, SDPA's output and fp32 log-sum-exp, the sigmoid gate and the heads' output reshaped to
        be gated (a·H·Dh each)."""
        from llmarch.analysis.activations import rotary_dim

        H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.dh
        rotated = a * (H + G) * Dh if rotary_dim(cfg) else 0
        return 4 * (H + G) * (Dh + 1) + rotated + 4 * H + 3 * a * H * Dh


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

    @staticmethod
    def saved_bytes(cfg, a: float, seq_len: int) -> float:
        """Per token, what the layer saves for the backward beyond x, the in-projections' output (less the b|a
        gates, which nothing keeps) and the out projection's input: the conv's zero-padded input and its output
        (a·C each); q and k repeated to the v heads and their 1/|·| (fp32); beta and softplus's input and output;
        the chunked rule's fp32 tensors over n chunks of C padded slots, per v head and slot 5 C-wide,
        3 Dv-wide, and 5 Dk-wide and 3 more (padded: fresh tensors, fewer copies, 4 Dk and 4; a second chunk
        adds the state read and write terms, 2·Dk·(n-1)/n, and unpadded 4 Dk of copies), per chunk its decay and the state
        entering it (Dk·Dv); the gated norm's fp32 input over the padded slots, 1/rms, normalised input, gained
        output and silu(z)."""
        m = cfg.linear
        H, Dk, Dv, C = m.n_v_heads, m.k_head_dim, m.v_head_dim, m.chunk_size
        n = -(-seq_len // C)
        slots = n * C / seq_len
        pad = n * C != seq_len
        later = 2 * Dk * (n - 1) / n  # q_in for chunks 1.., k_out for chunks ..n-2: sliced copies (batch > 1)
        per_slot = 5 * C + 3 * Dv + (4 * Dk + 4 + later if pad else 5 * Dk + 3 + (4 * Dk + later if n > 1 else 0))
        scan = 4 * H * (per_slot * slots + n * (1 + Dk * Dv) / seq_len)
        conv = a * m.conv_channels * (1 + (seq_len + m.conv_kernel - 1) / seq_len)
        qk = 4 * H * (2 * Dk + 2) if H > m.n_k_heads else a * m.conv_channels  # unrepeated: the conv output
        norm = 4 * H * (Dv * slots + 1 + 3 * Dv)
        return conv + qk + 12 * H + scan + norm - a * 2 * H

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
