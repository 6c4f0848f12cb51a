"""Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen
projection W plus a trainable update (alpha / r) B A, with A [r, in] Kaiming-uniform and B [out, r] zero, so a new
adapter leaves the model unchanged (the initialisation PEFT uses).

An adapted projection keeps its class, parameters and names (``qkv.weight`` stays ``qkv.weight``, so savers,
tied weights and quantized buffers are untouched): its class is swapped for a subclass that adds the adapters'
output, and swapped back by :func:`restore`. Adapters live in its ``adapters`` ModuleDict, one per output slot
(projection) it carries.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Adapter(nn.Module):
    """(alpha / r) B A dropout(x): x [*, in] -> [*, out]; A ``lora_A`` [r, in], B ``lora_B`` [out, r], kept in fp32
    (inputs are cast to it and the result back)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 device: torch.device | None = None):
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init of A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T  # [*, r]
        return (h @ self.lora_B.T * self.scaling).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The update as a weight, [out, in]."""
        return self.lora_B @ self.lora_A * self.scaling


class ExpertAdapter(nn.Module):
    """One adapter per expert of a bank weight [E, in, out]: ``lora_A`` [E, r, in], ``lora_B`` [E, out, r]. The
    update enters the weight (W_e + (alpha / r) A_e^T B_e^T), so every dispatch form of the bank sees it; no input
    dropout."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 device: torch.device | None = None):
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(n_experts, r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, out_features, r, device=device))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """[E, in, out] (the bank's layout)."""
        return (self.lora_A.transpose(1, 2) @ self.lora_B.transpose(1, 2)) * self.scaling


def _slotted(slots, adapters: nn.ModuleDict, piece, zeros) -> torch.Tensor:
    """Concatenate per-slot pieces along the last dim: an adapter's where one exists, zeros elsewhere."""
    parts = [piece(adapters[name]) if name in adapters else zeros(width) for name, width in slots]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class LoRAProjection:
    """Mixed in before a Linear-like class ([*, in] -> [*, out]: nn.Linear, the LM head, the quantized linears):
    y = base(x) + [adapter_slot(x) for each slot]. ``lora_slots`` (target, width), ``adapters`` ModuleDict,
    ``lora_merged`` (the update is inside the weight), ``lora_enabled`` (False: the base alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.lora_merged or not self.lora_enabled:
            return y
        scale = getattr(self, "scale", 1.0)  # the LM head rescales its input before the projection (T5)
        x = x * scale if scale != 1.0 else x
        return y + _slotted(self.lora_slots, self.adapters, lambda a: a(x), lambda w: x.new_zeros(*x.shape[:-1], w))

    def lora_delta(self) -> torch.Tensor:
        """The whole update as a weight [out, in] (zero rows for slots without an adapter)."""
        ref = next(iter(self.adapters.values())).lora_A
        return _slotted(self.lora_slots, self.adapters, lambda a: a.delta().T,
                        lambda w: ref.new_zeros(ref.shape[1], w)).T

    def lora_fold(self, sign: float) -> None:
        """weight += sign * update (merge: +1, unmerge: -1)."""
        weight = getattr(self, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise ValueError(f"merge: {type(self).__mro__[2].__name__} stores no float weight to merge into (a "
                             "quantized base); keep the adapters unmerged, or merge into a full-precision model")
        with torch.no_grad():
            weight.add_(sign * self.lora_delta().to(weight.dtype))


class LoRABank:
    """Mixed in before an expert bank class (stacked weights [E, in, out]): reading an adapted weight attribute
    (``gate_up``, ``up``, ``down``) returns W + update, so every dispatch form (one, batched, grouped, sliced)
    runs the adapted experts. ``lora_slots`` maps weight name -> slots; ``adapters`` key the target names."""

    def lora_weight(self, name: str) -> torch.Tensor:
        w = self._parameters[name]
        slots = self.lora_slots.get(name)
        if slots is None or self.lora_merged or not self.lora_enabled or not any(t in self.adapters
                                                                                for t, _ in slots):
            return w
        return w + self.lora_delta(name).to(w.dtype)

    def lora_delta(self, name: str) -> torch.Tensor:
        w = self._parameters[name]
        return _slotted(self.lora_slots[name], self.adapters, lambda a: a.delta(),
                        lambda width: w.new_zeros(w.shape[0], w.shape[1], width, dtype=torch.float32))

    def lora_fold(self, sign: float) -> None:
        with torch.no_grad():
            for name, slots in self.lora_slots.items():
                if any(t in self.adapters for t, _ in slots):
                    self._parameters[name].add_(sign * self.lora_delta(name).to(self._parameters[name].dtype))


_CLASSES: dict[tuple[type, type], type] = {}


def adapted_class(mixin: type, cls: type, weights: tuple[str, ...] = ()) -> type:
    """The subclass of ``cls`` with ``mixin`` in front (made once per class, named LoRA<cls>); a bank's
    ``weights`` become properties read through ``lora_weight``."""
    key = (mixin, cls, weights)
    if key not in _CLASSES:
        body = {name: property(lambda self, n=name: self.lora_weight(n)) for name in weights}
        _CLASSES[key] = type(f"LoRA{cls.__name__}", (mixin, cls), body)
    return _CLASSES[key]


def adapt(module: nn.Module, mixin: type, slots) -> None:
    """Swap ``module``'s class for its adapted subclass, with no adapters yet (``slots``: a bank's dict of weight
    name -> slots, else one projection's slots)."""
    weights = tuple(slots) if mixin is LoRABank else ()
    module.__class__ = adapted_class(mixin, type(module), weights)
    module.lora_slots = slots
    module.adapters = nn.ModuleDict()
    module.lora_merged, module.lora_enabled = False, True


def restore(module: nn.Module) -> None:
    """Drop the adapters and give ``module`` its original class back."""
    del module.adapters
    for name in ("lora_slots", "lora_merged", "lora_enabled"):
        module.__dict__.pop(name, None)
    module.__class__ = module.__class__.__mro__[2]


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, (LoRAProjection, LoRABank))
