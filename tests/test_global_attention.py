"""The ``longformer`` mixer (GlobalProjectionAttention) against a naive dense computation written here: local
queries attend their window and the global keys with ``qkv``; global queries attend every real (and, causally,
earlier) key with ``qkv_global``. GQA, padding, per-batch and fixed global tokens, both executions."""
from __future__ import annotations

import pytest
import torch

from llmarch.attention_config import SparseConfig
from llmarch.nn.attention import AttnContext
from llmarch.nn.global_attention import GlobalProjectionAttention
from llmarch.nn.patterns import build_pattern
from llmarch.nn.position import NoPositions

D, H, G, Dh, T, W = 24, 4, 2, 6, 19, 3


def naive(layer, x, real, glob, causal):
    """Softmax over the allowed keys, one projection set per kind of query row. x [B, T, D] -> [B, T, D]."""
    def heads(proj):
        q, k, v = proj(x).split([H * Dh, G * Dh, G * Dh], dim=-1)
        q = q.view(*x.shape[:2], H, Dh).transpose(1, 2)
        k, v = (t.view(*x.shape[:2], G, Dh).transpose(1, 2).repeat_interleave(H // G, dim=1) for t in (k, v))
        return q, k, v

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    local = ((i - j).abs() < W) | glob[:, :, None] | glob[:, None, :]  # [B, T, T]
    every = torch.ones(T, T, dtype=torch.bool)
    outs = []
    for proj, allowed in ((layer.qkv, local), (layer.qkv_global, every.expand_as(local))):
        q, k, v = heads(proj)
        m = allowed & real[:, None, :] & ((j <= i) if causal else every)
        s = (q @ k.transpose(-1, -2) * layer.scale).masked_fill(~m[:, None], float("-inf"))
        outs.append(torch.softmax(s, -1).nan_to_num() @ v)  # [B, H, T, Dh]
    y = torch.where(glob[:, None, :, None], outs[1], outs[0])
    return layer.out(y.transpose(1, 2).reshape(x.shape[0], T, H * Dh))


@pytest.mark.parametrize("execution", ["mask", "blocks"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_global_projection_attention_equals_naive(execution, causal):
    torch.manual_seed(0)
    sparse = SparseConfig(block=4, global_tokens=(0,), execution=execution)
    layer = GlobalProjectionAttention(D, H, G, Dh, layer_idx=0, pattern=build_pattern("longformer", window=W,
                                      sparse=sparse), qkv_bias=True, kernel="naive", execution=execution,
                                      block=4).eval()
    x = torch.randn(2, T, D)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, 14:] = False
    flags = torch.zeros(2, T, dtype=torch.bool)
    flags[0, [5, 11]] = True
    flags[1, 8] = True
    ctx = AttnContext(0, T, NoPositions(), torch.zeros(2, T, dtype=torch.long), real, causal=causal,
                      device=x.device, global_mask=flags)
    glob = flags.clone()
    glob[:, 0] = True  # sparse.global_tokens
    with torch.no_grad():
        ours, ref = layer(x, ctx), naive(layer, x, real, glob & real, causal)
    assert (ours - ref)[real].abs().max() < 1e-5


def test_global_projection_attention_refuses_a_cache_and_a_pattern_without_globals():
    sparse = SparseConfig()
    with pytest.raises(ValueError, match="mixer"):
        GlobalProjectionAttention(D, H, G, Dh, layer_idx=0, pattern=build_pattern("sliding", window=W, sparse=sparse))
    layer = GlobalProjectionAttention(D, H, G, Dh, layer_idx=0, pattern=build_pattern("longformer", window=W,
                                      sparse=sparse))
    ctx = AttnContext(0, T, NoPositions(), torch.zeros(1, T, dtype=torch.long), None, causal=True, device="cpu")
    with pytest.raises(ValueError, match="cache"):
        layer(torch.randn(1, T, D), ctx, cache=object())
