"""What the linear-time mixers and the mixture cost, read from the config (entries of ``MIXER_COSTS`` in
:mod:`llmarch.analysis.layers`): parameters by component, multiply-adds per token (no T² term: ``pair_macs`` is
0 for the recurrent mixers), and the fixed-size state each layer keeps while decoding (``state_numbers``, numbers
per sequence and layer, the same at any context) beside the KV numbers per token (``cache_numbers``).

MACs count the recurrent form (state update + read-out per token). The chunked form adds the quadratic part
inside each chunk of Q tokens, about Q/2 (C·B) and (scores·x) products per token and head, which is the price of
running on matmuls; the parallel form is O(T²) like attention.
"""
from __future__ import annotations

from llmarch.analysis.layers import AttentionCost


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
        """Per token: in_proj, conv, state update (H·Dh·N) and read-out (H·Dh·N), out_proj."""
        D, Di, H, GN, C, s = cls._sizes(cfg)
        return D * (2 * Di + 2 * GN + H) + C * s.conv_kernel + 2 * Di * s.d_state + Di * D

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
    def decode_macs(cls, cfg, keys: int) -> int:
        return cls.proj_macs(cfg)

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        return 0


class LinearCost(AttentionCost):
    """Linear attention: the projections of attention; per token a state update φ(k)[v | 1]ᵀ and a read-out
    φ(q)ᵀS (each H·Dh·(Dh + 1)); state H·(Dh + 1)·Dh."""

    @classmethod
    def proj_macs(cls, cfg) -> int:
        return AttentionCost.proj_macs(cfg) + 2 * cfg.n_heads * cfg.dh * (cfg.dh + 1)

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
    def decode_macs(cls, cfg, keys: int) -> int:
        return cls.proj_macs(cfg)


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
    def state_numbers(cfg) -> int:
        m = cfg.mixture
        local = AttentionCost.cache_numbers(cfg) * (m.window - 1) if "local" in m.components else 0
        linear = LinearCost.state_numbers(cfg) if "linear" in m.components else 0
        return local + linear + (cfg.d_model + 1 if m.controller == "mean" else m.controller_dim)

    @classmethod
    def decode_macs(cls, cfg, keys: int) -> int:
        m, pair = cfg.mixture, AttentionCost.pair_macs(cfg)
        seen = {"attention": keys, "random": min(keys, cfg.sparse.random_keys + 1), "local": min(keys, m.window)}
        return cls.proj_macs(cfg) + sum(seen[c] * pair for c in m.components if c in seen)

    @staticmethod
    def global_macs(cfg, batch: int, T: int) -> int:
        return 0


LINEAR_TIME_COSTS = {"mamba2": Mamba2Cost, "linear": LinearCost, "mixture": MixtureCost}


def state_bytes_per_layer(cfg, layer: int, bytes_per_number: float = 2.0) -> float:
    """The fixed-size decoding state of layer ``layer`` for one sequence (0 for a pure attention layer)."""
    from llmarch.analysis.layers import MIXER_COSTS

    cost = MIXER_COSTS[cfg.layer_mixer(layer)]
    return float(cost.state_numbers(cfg) * bytes_per_number) if hasattr(cost, "state_numbers") else 0.0
