"""The mixture of attention types (seed 002, "NextGenLLM"): one mixer that runs several mixers on the same input
(standard attention, linear attention, random attention, local attention) and adds their outputs weighted per
token by a softmax from a controller that reads the input: y_t = Σ_j w_tj · mixer_j(x)_t with Σ_j w_tj = 1.

Components come from :data:`COMPONENTS` (the ``mixture.components`` config value), controllers from
:data:`CONTROLLERS` (``mixture.controller``). Both controllers are causal (the weights of token t read tokens <= t
only), so the mixture works in a decoder and caches: component j of layer i fills the cache under the key
(i, j) (attention k/v or linear-attention state), the controller its running state under (i, "controller").
"""
from __future__ import annotations

import torch
from torch import nn

from llmarch.nn.attention import Attention
from llmarch.nn.linear_attention import LinearAttention
from llmarch.nn.mamba2 import new_tokens_mask
from llmarch.nn.patterns import build_pattern
from llmarch.registry import Registry

COMPONENTS: Registry = Registry("mixture.components")
CONTROLLERS: Registry[type[nn.Module]] = Registry("mixture.controller")


def _attention(cfg, key, pattern) -> Attention:
    return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, layer_idx=key, pattern=pattern,
                     qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, scale=cfg.attn_scale, kernel=cfg.attn_kernel,
                     dropout=cfg.attn_dropout)


@COMPONENTS.register("attention")
def standard_component(cfg, key, pattern):
    """Softmax attention under the layer's own pattern."""
    return _attention(cfg, key, pattern)


@COMPONENTS.register("linear")
def linear_component(cfg, key, pattern):
    """Causal linear attention, φ = elu + 1 (Katharopoulos et al. 2020)."""
    return LinearAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh, layer_idx=key, form=cfg.ssm.form,
                           chunk_size=cfg.ssm.chunk_size, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias)


@COMPONENTS.register("random")
def random_component(cfg, key, pattern):
    """Softmax attention to itself plus ``sparse.random_keys`` seeded random keys (the "random" pattern)."""
    return _attention(cfg, key, build_pattern("random", window=None, sparse=cfg.sparse, causal=pattern.causal))


@COMPONENTS.register("local")
def local_component(cfg, key, pattern):
    """Softmax attention within a sliding window of ``mixture.window`` keys."""
    return _attention(cfg, key, build_pattern("sliding", window=cfg.mixture.window, sparse=cfg.sparse,
                                              causal=pattern.causal))


@CONTROLLERS.register("mean")
class MeanController(nn.Module):
    """Mixing logits from the causal running mean of the real inputs: proj(mean_{s<=t} x_s). x [B, T, D] ->
    weights [B, T, M]. Cache: ``state[key]`` [B, D + 1], the running sum and count."""

    def __init__(self, d_model: int, n_components: int, hidden: int, key):
        super().__init__()
        self.key = key
        self.proj = nn.Linear(d_model, n_components)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        count = x.new_ones(B, T, 1) if real is None else real[..., None].to(x.dtype)
        sums = torch.cat([x * count, count], dim=-1).float().cumsum(1)  # [B, T, D + 1]
        prev = cache.state.get(self.key) if cache is not None else None
        if prev is not None:
            sums = sums + prev[:, None]
        if cache is not None:
            cache.state[self.key] = sums[:, -1]
        mean = sums[..., :-1] / sums[..., -1:].clamp(min=1.0)
        return torch.softmax(self.proj(mean.to(x.dtype)).float(), dim=-1).to(x.dtype)


@CONTROLLERS.register("recurrent")
class RecurrentController(nn.Module):
    """Mixing logits from a GRU over the inputs (padding steps keep the hidden state): proj(h_t). x [B, T, D] ->
    weights [B, T, M]. Cache: ``state[key]`` [B, hidden], the GRU state."""

    def __init__(self, d_model: int, n_components: int, hidden: int, key):
        super().__init__()
        self.key = key
        self.gru = nn.GRUCell(d_model, hidden)
        self.proj = nn.Linear(hidden, n_components)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        h = cache.state.get(self.key) if cache is not None else None
        h = x.new_zeros(B, self.gru.hidden_size) if h is None else h
        hs = []
        for t in range(T):
            new = self.gru(x[:, t], h)
            h = new if real is None else torch.where(real[:, t, None], new, h)
            hs.append(h)
        if cache is not None:
            cache.state[self.key] = h
        return torch.softmax(self.proj(torch.stack(hs, dim=1)).float(), dim=-1).to(x.dtype)


class MixtureOfMixers(nn.Module):
    """x [B, T, D] -> Σ_j w_j ⊙ component_j(x), [B, T, D]; w [B, T, M] from the controller, Σ_j w_j = 1."""

    def __init__(self, components: nn.ModuleList, controller: nn.Module):
        super().__init__()
        self.components, self.controller = components, controller

    def weights(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        """The controller's mixing weights [B, T, M] (advances its cached state when a cache is given)."""
        return self.controller(x, new_tokens_mask(ctx, x.shape[1]), cache)

    def forward(self, x: torch.Tensor, ctx, cache=None) -> torch.Tensor:
        w = self.weights(x, ctx, cache)
        out = 0.0
        for j, component in enumerate(self.components):
            out = out + w[..., j, None] * component(x, ctx, cache)
        return out


def build_mixture(cfg, layer: int, pattern) -> MixtureOfMixers:
    m = cfg.mixture
    parts = nn.ModuleList(COMPONENTS[name](cfg, (layer, j), pattern) for j, name in enumerate(m.components))
    return MixtureOfMixers(parts, CONTROLLERS[m.controller](cfg.d_model, len(parts), m.controller_dim,
                                                            (layer, "controller")))
