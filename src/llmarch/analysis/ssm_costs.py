"""What Mamba-2, linear attention and the mixture cost, read from the config (entries of ``MIXER_COSTS`` in
:mod:`llmarch.analysis.layers`): parameters by component; multiply-adds per token of the projections and the
convolution (``proj_macs``); the sequence mixing of T tokens in the chunked form (``mixing_macs``: no T² term
for the recurrent mixers, ``pair_macs`` is 0); the work of one decoded token (``decode_macs``: the recurrent
step); and the fixed-size state each layer keeps while decoding (``state_numbers``; ``state_bytes`` with the
SSM / linear-attention state in fp32 as the mixers keep it) beside the per-token KV numbers (``cache_numbers``).

Chunked SSD over Tp = ceil(T / Q)·Q slots, per sequence and head (state N × Dh, chunk Q): per chunk C·Bᵀ
(Q²·N), scores·x (Q²·Dh), the chunk's state Bᵀ·x (Q·N·Dh) and the read-out of its start state C·S (Q·N·Dh) —
the matmuls ``torch.utils.flop_counter`` counts. Linear attention is the same scan with N = Dh and values of
Dh + 1 (the normaliser column).
"""
from __future__ import annotations

import math

from llmarch.analysis.layers import MIXER_COSTS, AttentionCost


def chunked_scan_macs(batch: int, T: int, heads: int, n: int, dv: int, chunk: int) -> int:
    """Matmul multiply-adds of the chunked scan (see the module docstring)."""
    Q = min(chunk, T)
    return batch * heads * math.ceil(T / Q) * (Q * Q * (n + dv) + 2 * Q * n * dv)


class Mamba2Cost:
    """Mamba-2: in_proj D -> 2Di + 2GN + H, a depthwise conv of K taps over Di + 2GN channels, dt_bias, A_log and
    D per head, the gated norm (Di), out_proj Di -> D. State: conv (Di + 2GN)·(K-1) + SSM H·Dh·N."""

    @staticmethod
    def _sizes(cfg):
        s, D = cfg.ssm, cfg.d_model
        Di, H, GN = s.inner(D), s.heads(D), s.n_groups * s.d_state
        return D, Di, H, GN, Di + 2 * GN, s

    @classmethod
    def params(cls, cfg) -> dict[str, int]:
        D, Di, H, GN, C, s = cls._sizes(cfg)
        width = 2 * Di + 2 * GN + H
        return {"attn_in": D * width + (width if s.proj_bias else 0),
                "attn_conv": C * s.conv_kernel + (C if s.conv_bias else 0),
                "attn_ssm": 3 * H + Di, "attn_o": Di * D + (D if s.proj_bias else 0)}

    @classmethod
    def proj_macs(cls, cfg) -> int:
        """Per token: in_proj, the K conv taps per channel, out_proj."""
        D, Di, H, GN, C, s = cls._sizes(cfg)
        return D * (2 * Di + 2 * GN + H) + C * s.conv_kernel + Di * D

    @staticmethod
    def pair_macs(cfg) -> int:
        return 0

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        return None  # nothing grows with the context

    @classmethod
    def state_numbers(cls, cfg) -> int:
        D, Di, H, GN, C, s = cls._sizes(cfg)
        return C * (s.conv_kernel - 1) + Di * s.d_state

    @classmethod
    def state_bytes(cls, cfg, dtype_bytes: float) -> float:
        """The conv window in the model's dtype, the SSM state H·Dh·N in fp32."""
        D, Di, H, GN, C, s = cls._sizes(cfg)
        return dtype_bytes * C * (s.conv_kernel - 1) + 4.0 * Di * s.d_state

    @classmethod
    def mixing_macs(cls, cfg, batch: int, T: int) -> int:
        s = cfg.ssm
        return chunked_scan_macs(batch, T, s.heads(cfg.d_model), s.d_state, s.head_dim, s.chunk_size)

    @classmethod
    def widths(cls, cfg) -> tuple[int, int]:
        """(in_proj output width, out_proj input width) per token."""
        D, Di, H, GN, C, s = cls._sizes(cfg)
        return 2 * Di + 2 * GN + H, Di

    @classmethod
    def saved_bytes(cls, cfg, a: float, seq_len: int) -> float:
        """Per token, what the block saves for the backward beyond the projections' inputs and outputs: the
        conv's zero-padded input (T + K - 1 steps), its output and silu(output) (a·C each); dt's softplus input,
        output and clamp (fp32, 3·H); the chunked scan's fp32 tensors over n chunks of Q padded slots, per head
        and slot C and Bᵀ (2N), the masked scores and decays (3Q), x·dt and the state read-out (2Dh), two decays,
        with n > 1 the B weighted to the chunk end (N; unpadded, the reshapes also copy B·decay, x·dt and C:
        2N + Dh more), per chunk its decay, and 2n - 1 states N·Dh (the update
        to the final state, unused, is freed); the gated norm's fp32 y, silu(z), y·silu(z) (12·Di), its
        per-group 1/rms (4·G) and the normalised product (a·Di)."""
        D, Di, H, GN, C, s = cls._sizes(cfg)
        N, Dh = s.d_state, s.head_dim
        Q = min(s.chunk_size, seq_len)
        n = -(-seq_len // Q)
        pad = n * Q != seq_len  # padded inputs are fresh tensors, whose chunk reshapes are views, not copies
        per_slot = 2 * N + 3 * Q + 2 * Dh + 2 + ((N if pad else 3 * N + Dh) if n > 1 else 0)
        scan = 4 * H * (n * Q * per_slot + n + (2 * n - 1) * N * Dh) / seq_len + 12 * H
        conv = a * C * (2 + (seq_len + s.conv_kernel - 1) / seq_len)
        return conv + scan + 12 * Di + 4 * s.n_groups + a * Di

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        """The projections and the recurrent step: state update and read-out, H·Dh·N each."""
        return cls.proj_macs(cfg) + 2 * cfg.ssm.inner(cfg.d_model) * cfg.ssm.d_state

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        return 0


class LinearCost(AttentionCost):
    """Linear attention: the projections of attention; decoding a token updates the state with φ(k)[v | 1]ᵀ and
    reads it with φ(q)ᵀS (each H·Dh·(Dh + 1)); state H·(Dh + 1)·Dh."""

    @staticmethod
    def pair_macs(cfg) -> int:
        return 0

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        return None

    @staticmethod
    def state_numbers(cfg) -> int:
        return cfg.n_heads * (cfg.dh + 1) * cfg.dh

    @classmethod
    def state_bytes(cls, cfg, dtype_bytes: float) -> float:
        return 4.0 * cls.state_numbers(cfg)  # kept in fp32

    @staticmethod
    def mixing_macs(cfg, batch: int, T: int) -> int:
        return chunked_scan_macs(batch, T, cfg.n_heads, cfg.dh, cfg.dh + 1, cfg.ssm.chunk_size)

    @staticmethod
    def widths(cfg) -> tuple[int, int]:
        return (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh, cfg.n_heads * cfg.dh

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        """The projections and the recurrent step: φ(k)[v | 1]ᵀ update and φ(q)ᵀS read-out."""
        return cls.proj_macs(cfg) + 2 * cfg.n_heads * cfg.dh * (cfg.dh + 1)


SOFTMAX_COMPONENTS = ("attention", "random", "local")  # each a full attention (own q/k/v/o) under a pattern


class MixtureCost:
    """The mixture: the sum of its components (each with its own projections) and the controller (mean: a
    [D -> M] linear; recurrent: a GRU cell D -> hidden and a [hidden -> M] linear). Softmax components are
    counted as dense T×S score matrices (the mask execution computes them all); cached keys: attention and random
    keep every key, local at most ``mixture.window``, the linear component and the controller a fixed state."""

    @staticmethod
    def _parts(cfg):
        return [LinearCost if c == "linear" else AttentionCost for c in cfg.mixture.components]

    @staticmethod
    def _controller(cfg) -> int:
        m, D, M = cfg.mixture, cfg.d_model, len(cfg.mixture.components)
        if m.controller == "mean":
            return D * M + M
        Hc = m.controller_dim
        return 3 * Hc * (D + Hc + 2) + Hc * M + M

    @classmethod
    def params(cls, cfg) -> dict[str, int]:
        out = {"attn_controller": cls._controller(cfg)}
        for part in cls._parts(cfg):
            for k, v in part.params(cfg).items():
                out[k] = out.get(k, 0) + v
        return out

    @classmethod
    def proj_macs(cls, cfg) -> int:
        ctrl = cls._controller(cfg)  # one multiply-add per weight, per token
        return ctrl + sum(part.proj_macs(cfg) for part in cls._parts(cfg))

    @staticmethod
    def pair_macs(cfg) -> int:
        return sum(AttentionCost.pair_macs(cfg) for c in cfg.mixture.components if c in SOFTMAX_COMPONENTS)

    @staticmethod
    def cache_numbers(cfg) -> int | None:
        """Per token: k/v of the attention and random components (the local one is capped, in the state)."""
        return sum(AttentionCost.cache_numbers(cfg) for c in cfg.mixture.components if c in ("attention", "random"))

    @staticmethod
    def _state_parts(cfg) -> tuple[int, int, int]:
        """(numbers in the model's dtype, numbers in fp32) of the fixed state: local k/v window and GRU state;
        linear-attention state and the mean controller's running sum."""
        m = cfg.mixture
        local = AttentionCost.cache_numbers(cfg) * (m.window - 1) if "local" in m.components else 0
        linear = LinearCost.state_numbers(cfg) if "linear" in m.components else 0
        mean = m.controller == "mean"
        return local + (0 if mean else m.controller_dim), linear + (cfg.d_model + 1 if mean else 0)

    @classmethod
    def state_numbers(cls, cfg) -> int:
        return sum(cls._state_parts(cfg))

    @classmethod
    def state_bytes(cls, cfg, dtype_bytes: float) -> float:
        model_dtype, fp32 = cls._state_parts(cfg)
        return dtype_bytes * model_dtype + 4.0 * fp32

    @staticmethod
    def mixing_macs(cfg, batch: int, T: int) -> int:
        """Dense T×T scores for each softmax component (the mask execution computes them all), the chunked scan
        for the linear one."""
        soft = sum(1 for c in cfg.mixture.components if c in SOFTMAX_COMPONENTS)
        linear = LinearCost.mixing_macs(cfg, batch, T) if "linear" in cfg.mixture.components else 0
        return soft * batch * T * T * AttentionCost.pair_macs(cfg) + linear

    @staticmethod
    def widths(cfg) -> tuple[int, int]:
        n = len(cfg.mixture.components)
        return n * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.dh, n * cfg.n_heads * cfg.dh

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        m, pair = cfg.mixture, AttentionCost.pair_macs(cfg)
        seen = {"attention": keys, "random": min(keys, cfg.sparse.random_keys + 1), "local": min(keys, m.window)}
        linear = LinearCost.decode_macs(cfg, keys) - LinearCost.proj_macs(cfg) if "linear" in m.components else 0
        return cls.proj_macs(cfg) + linear + sum(seen[c] * pair for c in m.components if c in seen)

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        return 0


MIXER_COSTS.update(mamba2=Mamba2Cost, linear=LinearCost, mixture=MixtureCost)
