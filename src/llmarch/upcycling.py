"""Sparse upcycling (Komatsuzaki et al. 2023): turn a dense checkpoint into a mixture of experts by copying each
dense FFN into every expert of that layer and adding a freshly initialised router. With a router whose K weights
sum to one, every token's output is sum_k w_k * FFN(x) = FFN(x): the upcycled model computes what the dense one
did (up to float rounding) until training moves the experts apart. Dropped tokens (a capacity limit) break that
equality, so upcycle into a dropless config to start exactly."""
from __future__ import annotations

import dataclasses

import torch

from llmarch.model import Model, build
from llmarch.moe_config import MoEConfig
from llmarch.nn.router import ROUTERS


def upcycle(dense: Model, moe: MoEConfig, seed: int | None = None) -> Model:
    """A new MoE model whose MoE layers (per ``moe``'s schedule) hold E copies of ``dense``'s FFN; all other
    weights are copied. ``seed`` fixes the router initialisation. The dense model is left unchanged."""
    cfg = dense.config
    if cfg.moe is not None:
        raise ValueError("upcycle: the model is already a mixture of experts (config.moe is set)")
    if cfg.ffn != moe.expert_ffn:
        raise ValueError(f"moe.expert_ffn: the dense model's FFN is {cfg.ffn!r}; set expert_ffn={cfg.ffn!r}")
    if moe.expert_d_ff(cfg.d_ff) != cfg.d_ff:
        raise ValueError(f"moe.d_ff: experts copy the dense FFN of width {cfg.d_ff}; set d_ff=None")
    if moe.n_shared:
        raise ValueError("moe.n_shared: upcycling copies the dense FFN into routed experts only; set n_shared=0")
    if not ROUTERS[moe.router].weights_sum_to_one:
        good = [n for n in ROUTERS.names() if ROUTERS[n].weights_sum_to_one]
        raise ValueError(f"moe.router: {moe.router!r} does not make the K weights sum to one, so the upcycled "
                         f"model would not equal the dense one; use one of {good}")
    if moe.routed_scale != 1.0:
        raise ValueError(f"moe.routed_scale: {moe.routed_scale} scales the routed weights away from summing to one; "
                         "set routed_scale=1.0 to upcycle")
    if cfg.ffn_bias:
        raise ValueError("ffn_bias: experts have no biases; upcycle a dense model with ffn_bias=False")
    new_cfg = cfg.replace(ffn="moe", moe=dataclasses.replace(moe))
    dtype = next(dense.parameters()).dtype
    if seed is not None:
        torch.manual_seed(seed)
    model = build(new_cfg, dtype=dtype, device=next(dense.parameters()).device)
    state = dense.state_dict()
    moe_ffn = [f"decoder.layers.{i}.ffn." for i in range(cfg.n_layers) if moe.is_moe_layer(i)]
    shared = {k: v for k, v in state.items() if not k.startswith(tuple(moe_ffn))}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    new_only = [k for k in missing if not k.startswith(tuple(moe_ffn))]
    if new_only or unexpected:
        raise ValueError(f"upcycle: dense and MoE models differ outside the FFNs: {new_only + unexpected}")
    with torch.no_grad():
        for i in range(cfg.n_layers):
            if moe.is_moe_layer(i):
                bank = model.decoder.layers[i].ffn.experts
                for e in range(moe.n_experts):
                    bank.load_dense(e, dense.decoder.layers[i].ffn)
    return model
