"""MoEConfig: the mixture-of-experts settings of a model (the ``moe`` field of :class:`llmarch.ModelConfig`).

A model with ``ffn="moe"`` carries one; its MoE layers are chosen by a layer schedule (``first_dense``,
``every``, ``offset``) and the other layers get a dense FFN of kind ``expert_ffn`` and width ``ModelConfig.d_ff``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmarch.validation import check_field_types


def _fail(name: str, message: str) -> None:
    raise ValueError(f"moe.{name}: {message}")


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(name, f"must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts (Shazeer et al. 2017; Switch, Fedus et al. 2021; GShard, Lepikhin et al. 2020).

    Sizes: E ``n_experts`` routed experts, K ``top_k`` per token, F ``d_ff`` per expert (None = the model's
    ``d_ff``). ``n_shared`` always-on experts of width ``shared_d_ff`` each (None = F) run beside the routed ones
    (DeepSeekMoE, Qwen2-MoE), optionally scaled by a learned sigmoid gate (``shared_gate``, Qwen2-MoE).
    Capacity: None for both ``capacity_factor`` and ``expert_capacity`` is dropless; otherwise each expert serves
    at most ceil(capacity_factor * T * K / E) (or ``expert_capacity``) assignments per sequence.
    Layer schedule: layer i is MoE iff i >= ``first_dense`` and i % ``every`` == ``offset`` (Switch: every 2,
    offset 1; Qwen2-MoE's decoder_sparse_step s: every s, offset s - 1; DeepSeek: first_dense k).
    DeepSeek-V2 routing: ``routed_scale`` multiplies the routed weights; ``n_groups`` > 1 splits the experts into
    equal groups, ranks each group by its highest router probability and lets a token choose only inside its
    ``topk_groups`` best groups (device-limited routing, "group_limited_greedy").
    """

    n_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None
    router: str = "topk_softmax"  # registry nn.router.ROUTERS
    router_bias: bool = False
    expert_ffn: str = "glu"  # registry nn.experts.EXPERTS; also the kind of the schedule's dense layers
    capacity_factor: float | None = None
    expert_capacity: int | None = None
    jitter: float = 0.0  # multiplicative router-input noise in training (Switch)
    balance_coef: float = 0.01  # load-balancing loss coefficient
    balance: str = "switch"  # registry nn.balance.BALANCE_LOSSES: switch | squared (the seed's variant)
    importance_coef: float | None = None  # balance "squared": the importance term's coefficient (None = balance_coef)
    z_coef: float = 0.0  # router z-loss coefficient (ST-MoE)
    n_shared: int = 0
    shared_d_ff: int | None = None
    shared_gate: bool = False
    every: int = 1
    offset: int = 0
    first_dense: int = 0
    dispatch: str = "auto"  # registry nn.dispatch.DISPATCHERS
    # --- DeepSeek routing ---
    routed_scale: float = 1.0  # the K routed weights are multiplied by it (DeepSeek routed_scaling_factor)
    n_groups: int = 1  # group-limited routing: E experts in n_groups groups (1 = off)
    topk_groups: int | None = None  # ... each token picks its K experts inside its topk_groups best groups

    def __post_init__(self) -> None:
        check_field_types(self, "moe.")

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense and layer % self.every == self.offset

    def expert_d_ff(self, model_d_ff: int) -> int:
        return self.d_ff if self.d_ff is not None else model_d_ff

    def validate(self, n_layers: int) -> None:
        from llmarch.nn.dispatch import DISPATCHERS
        from llmarch.nn.experts import EXPERTS
        from llmarch.nn.router import ROUTERS

        for name in ("n_experts", "top_k", "every"):
            _positive_int(name, getattr(self, name))
        for name in ("d_ff", "shared_d_ff", "expert_capacity"):
            _positive_int(name, getattr(self, name), allow_none=True)
        if self.top_k > self.n_experts:
            _fail("top_k", f"{self.top_k} is more than n_experts ({self.n_experts})")
        for name, registry in (("router", ROUTERS), ("expert_ffn", EXPERTS), ("dispatch", DISPATCHERS)):
            if getattr(self, name) not in registry:
                _fail(name, f"{getattr(self, name)!r} is not allowed; choose one of {registry.names()}")
        fixed_k = ROUTERS[self.router].fixed_k
        if fixed_k is not None and self.top_k != fixed_k:
            _fail("top_k", f"router {self.router!r} routes each token to {fixed_k} expert(s); set top_k={fixed_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            _fail("capacity_factor", f"must be > 0 or None (dropless), got {self.capacity_factor}")
        if self.capacity_factor is not None and self.expert_capacity is not None:
            _fail("expert_capacity", "give either capacity_factor or expert_capacity, not both")
        if not 0.0 <= self.jitter < 1.0:
            _fail("jitter", f"must be in [0, 1), got {self.jitter}")
        for name in ("balance_coef", "z_coef", "importance_coef"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                _fail(name, f"must be >= 0, got {getattr(self, name)}")
        self.validate_balance()
        if isinstance(self.n_shared, bool) or not isinstance(self.n_shared, int) or self.n_shared < 0:
            _fail("n_shared", f"must be an integer >= 0, got {self.n_shared!r}")
        if self.shared_gate and self.n_shared == 0:
            _fail("shared_gate", "gates the shared experts; set n_shared >= 1 or shared_gate=False")
        if isinstance(self.first_dense, bool) or not isinstance(self.first_dense, int) or self.first_dense < 0:
            _fail("first_dense", f"must be an integer >= 0, got {self.first_dense!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or not 0 <= self.offset < self.every:
            _fail("offset", f"must be an integer in [0, every={self.every}), got {self.offset!r}")
        self.validate_groups()
        if not any(self.is_moe_layer(i) for i in range(n_layers)):
            _fail("every", f"the schedule (first_dense={self.first_dense}, every={self.every}, offset={self.offset}) "
                  f"makes none of the n_layers={n_layers} layers MoE; lower first_dense or every")

    def validate_balance(self) -> None:
        from llmarch.nn.balance import BALANCE_LOSSES

        if self.balance not in BALANCE_LOSSES:
            _fail("balance", f"{self.balance!r} is not allowed; choose one of {BALANCE_LOSSES.names()}")
        if self.importance_coef is not None and self.balance != "squared":
            _fail("importance_coef", f"weighs the importance term of balance='squared'; balance is {self.balance!r}: "
                  "set balance='squared' or leave importance_coef unset")

    def importance_weight(self) -> float:
        """The importance term's coefficient (balance "squared"); None means the same as ``balance_coef``."""
        return self.balance_coef if self.importance_coef is None else self.importance_coef

    def validate_groups(self) -> None:
        if isinstance(self.routed_scale, bool) or not isinstance(self.routed_scale, (int, float)) \
                or not self.routed_scale > 0:
            _fail("routed_scale", f"must be a number > 0 (1.0 = unscaled), got {self.routed_scale!r}")
        _positive_int("n_groups", self.n_groups)
        _positive_int("topk_groups", self.topk_groups, allow_none=True)
        if self.n_groups == 1:
            if self.topk_groups not in (None, 1):
                _fail("topk_groups", "only applies to group-limited routing; set n_groups > 1 or topk_groups=None")
            return
        if self.n_experts % self.n_groups:
            _fail("n_groups", f"{self.n_groups} groups do not divide n_experts={self.n_experts}")
        if self.topk_groups is None or self.topk_groups > self.n_groups:
            _fail("topk_groups", f"group-limited routing needs topk_groups in [1, n_groups={self.n_groups}], "
                  f"got {self.topk_groups!r}")
        if self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            _fail("top_k", f"{self.top_k} is more than the {self.topk_groups} kept groups hold "
                  f"({self.topk_groups * (self.n_experts // self.n_groups)} experts)")
        if self.router not in ("softmax_topk", "softmax_topk_norm"):
            _fail("n_groups", f"group-limited routing ranks softmax probabilities; router {self.router!r} does not "
                  "support it (use softmax_topk or softmax_topk_norm)")
