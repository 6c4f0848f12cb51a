"""What the FFN of one layer costs, read from the config: a dense MLP or GLU, or a mixture of experts.

The MoE sub-config is read only here, through the fields every :class:`llmarch.MoEConfig` has: ``n_experts`` (E),
``top_k`` (K), ``expert_d_ff(d_ff)`` (F per routed expert), ``expert_ffn`` (the experts' kind, also the kind of
the schedule's dense layers), ``router_bias``, ``n_shared`` shared experts of ``shared_d_ff`` (fused into one FFN
of width n_shared·F_shared, no biases), ``shared_gate`` (a [D -> 1] gate) and the schedule ``is_moe_layer(i)``.
Settings that carry no parameters and no matmuls (router kind, capacity, jitter, loss coefficients, a scale on
the routed output) do not change the counts. Capacity limits are not modelled: MACs count every assignment (the
dropless upper bound).
"""
from __future__ import annotations

from dataclasses import dataclass

# FFN kind -> (number of D×F matrices, bias length in units of F, bias length in units of D)
FFN_SHAPES = {"mlp": (2, 1, 1), "glu": (3, 2, 1), "none": (0, 0, 0)}  # none: a mixer-only block (no norm either)


def ffn_matrices(kind: str) -> int:
    if kind not in FFN_SHAPES:
        raise ValueError(f"ffn: the analysis does not know the shape of {kind!r}; add it to "
                         "llmarch/analysis/ffn.py FFN_SHAPES")
    return FFN_SHAPES[kind][0]


def dense_ffn_params(d_model: int, d_ff: int, kind: str, bias: bool) -> int:
    """One dense FFN of width ``d_ff`` (an MLP, or a GLU with its third matrix), with or without biases."""
    ffn_matrices(kind)
    mats, bias_f, bias_d = FFN_SHAPES[kind]
    return mats * d_model * d_ff + (bias_f * d_ff + bias_d * d_model if bias else 0)


@dataclass(frozen=True)
class FFNCost:
    """One layer's FFN: parameters by component, the parameters one token uses, and its MACs per token."""

    components: dict[str, int]
    active: int
    macs: int
    kind: str  # the dense kind, or "moe"

    @property
    def has_norm(self) -> bool:
        """Whether the block puts a norm before this FFN (not before FFN "none")."""
        return self.kind != "none"

    @property
    def params(self) -> int:
        return sum(self.components.values())


def is_moe_layer(cfg, layer: int) -> bool:
    return cfg.moe is not None and cfg.moe.is_moe_layer(layer)


def dense_kind(cfg) -> str:
    """The kind of a dense FFN layer: ``ffn``, or the experts' kind off the MoE schedule."""
    return cfg.moe.expert_ffn if cfg.moe is not None else cfg.ffn


def shared_width(cfg) -> int:
    """n_shared · F_shared: the width of the fused shared-expert FFN (0 without shared experts)."""
    m = cfg.moe
    return m.n_shared * (m.shared_d_ff or m.expert_d_ff(cfg.d_ff)) if m is not None and m.n_shared else 0


def activation_params(name: str) -> int:
    """Trainable parameters of one activation instance (a learned swish has its beta)."""
    from llmarch.nn.activation import ACTIVATIONS

    return getattr(ACTIVATIONS[name], "n_params", 0)


def ffn_cost(cfg, layer: int) -> FFNCost:
    """The FFN of ``layer`` of a stack, as ``llmarch.model.ffn_for`` builds it."""
    D = cfg.d_model
    act = activation_params(cfg.activation)
    if not is_moe_layer(cfg, layer):
        kind = dense_kind(cfg)
        bias = cfg.ffn_bias and cfg.moe is None
        p = dense_ffn_params(D, cfg.d_ff, kind, bias) + act
        return FFNCost({"ffn": p}, p, ffn_matrices(kind) * D * cfg.d_ff, kind)
    m = cfg.moe
    E, K, F, mats = m.n_experts, m.top_k, m.expert_d_ff(cfg.d_ff), ffn_matrices(m.expert_ffn)
    router = D * E + (E if m.router_bias else 0)
    expert = mats * D * F
    router += act  # the experts share one activation instance (counted here so experts stay E x one expert)
    Fs = shared_width(cfg)
    shared = mats * D * Fs + (D if m.shared_gate and Fs else 0) + (act if Fs else 0)
    comps = {"router": router, "experts": E * expert, "shared_experts": shared}
    macs = D * E + K * expert + mats * D * Fs + (D if m.shared_gate and Fs else 0)
    return FFNCost(comps, router + K * expert + shared, macs, "moe")
