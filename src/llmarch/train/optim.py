"""AdamW with decoupled weight decay (Loshchilov & Hutter 2019) on matrices only, a warmup + cosine learning-rate
schedule, mixed precision (autocast, with a gradient scaler for fp16) and per-block activation checkpointing."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight-decayed matrices, and everything else (norm gains, biases, embedding tables)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# devices whose parameters torch's fused AdamW updates (one kernel per parameter, in place: on a Zen 5 EPYC, one
# thread, 3.2-3.4x faster than torch's default per-tensor loop and its temporaries on 30-124M-parameter models,
# 3.5-5.5x when freed memory goes back to the system; GPT-2-124M 70 against 223 ms; benchmarks/optimizer.py)
FUSED_DEVICES = ("cpu", "cuda")


def fused_ok(params) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain floating-point tensors (not the DTensors of FSDP2
    or tensor parallelism, where torch's fused update meets its plain step counters and refuses the mix), all on
    one device type it serves."""
    params = list(params)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            return False
    return bool(params) and all(p.is_floating_point() for p in params) and len(
        {p.device.type for p in params}) == 1 and params[0].device.type in FUSED_DEVICES


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   eps: float = 1e-5) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused where torch has the fused kernel for the parameters' device (the same
    update as the per-tensor loop, up to the rounding of the order of its operations)."""
    groups = param_groups(model, weight_decay)
    fused = fused_ok(p for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After loading a saved optimizer state: run the implementation this optimizer was made with (a state saved by
    an earlier llmarch names the per-tensor loop in its groups)."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


class WarmupCosine:
    """lr(step) = peak * step / warmup during warmup, then a cosine from peak to ``min_ratio * peak`` at
    ``total`` steps. ``step`` counts optimizer updates already done; its state is that count."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak: float, warmup: int, total: int,
                 min_ratio: float = 0.1):
        self.optimizer, self.peak, self.warmup, self.total, self.min_ratio = optimizer, peak, warmup, total, min_ratio
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.peak * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak": self.peak, "warmup": self.warmup, "total": self.total,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


class Precision:
    """Autocast context for the forward pass and, for fp16, a gradient scaler; fp32 is a no-op."""

    def __init__(self, name: str, device_type: str):
        if name not in PRECISIONS:
            raise ValueError(f"precision: {name!r} is not allowed; choose one of {sorted(PRECISIONS)}")
        self.name, self.device_type, self.dtype = name, device_type, PRECISIONS[name]
        self.scaler = torch.amp.GradScaler(device_type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every ``layers`` ModuleList of the model (one per stack): the blocks."""
    return [m.layers for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)]


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them (Chen et al. 2016).
    Wraps each block's forward in place, so parameter names and checkpoints are unchanged. Returns the count.

    Blocks take (x, ctx, cache); ``ctx`` memoises masks and position biases for the blocks after the first. A
    block's recomputation starts from the memo its first run saw (``ctx.memo()``), so it builds what that run
    built: the same ops, and the same tensors saved."""
    n = 0
    for layers in block_lists(model):
        for block in layers:
            plain = block.forward

            def forward(x, ctx, *args, _plain=plain, **kwargs):
                memo = ctx.memo() if hasattr(ctx, "memo") else None

                def run(x, ctx, *args, **kwargs):
                    if memo is not None:
                        ctx.restore_memo(memo)
                    return _plain(x, ctx, *args, **kwargs)

                return checkpoint(run, x, ctx, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            n += 1
    return n


__all__ = ["make_optimizer", "keep_implementation", "fused_ok", "param_groups", "WarmupCosine", "Precision",
           "enable_activation_checkpointing", "PRECISIONS"]
