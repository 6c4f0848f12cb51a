"""The analysis of the linear-time mixers and the mixture: exact parameter counts (against the built model) and
the decoding memory: a fixed state per layer (``state_numbers``) plus ``cache_numbers`` per token, equal to what
the StateCache holds after decoding."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.analysis.layers import MIXER_COSTS
from llmarch.analysis.params import count_params, meta_param_count

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, norm_bias=False,
            ssm=dict(d_state=8, n_groups=2, head_dim=8, chunk_size=4), sparse=dict(random_keys=2))
CONFIGS = {
    "mamba2": dict(BASE, mixer="mamba2", ffn="none", position="none", ssm=dict(BASE["ssm"], proj_bias=True)),
    "linear": dict(BASE, mixer="linear", qkv_bias=True),
    "mixture-mean": dict(BASE, mixer="mixture", mixture=dict(window=3)),
    "mixture-recurrent": dict(BASE, mixer="mixture", mixture=dict(window=3, controller="recurrent",
                                                                  components=["linear", "local"])),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_params_and_decoding_memory_are_exact(name):
    cfg = llmarch.ModelConfig(**CONFIGS[name])
    assert count_params(cfg).total == meta_param_count(cfg)
    m = llmarch.build(cfg, dtype=torch.bfloat16).eval()
    B, T = 2, 7
    with torch.no_grad():
        cache = m.new_cache()
        m(torch.randint(0, 97, (B, T - 1)), cache=cache)
        m(torch.randint(0, 97, (B, 1)), cache=cache)
    cost = MIXER_COSTS[cfg.mixer]
    held = sum(t.numel() for d in (cache.k, cache.v, cache.conv, cache.state) for t in d.values())
    per_layer = cost.state_numbers(cfg) + T * (cost.cache_numbers(cfg) or 0)
    assert held == B * cfg.n_layers * per_layer
    # bytes: k/v and conv windows in bf16, the recurrent states (and the mean controller's sums) in fp32
    assert cache.nbytes() == B * cfg.n_layers * (cost.state_bytes(cfg, 2) + 2 * T * (cost.cache_numbers(cfg) or 0))


@pytest.mark.parametrize("name", ["mamba2", "linear"])
def test_decode_flops_equal_flop_counter(name):
    """One cached token (the recurrent step): torch's counter sees the projections, the convolution and the
    state read-out (a matmul); the state update is elementwise, which it does not count."""
    from torch.utils.flop_counter import FlopCounterMode

    from llmarch.analysis.flops import decode_flops_per_token

    cfg = llmarch.ModelConfig(**CONFIGS[name])
    m = llmarch.build(cfg).eval()
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.randint(0, 97, (1, 5)), cache=cache)
        with FlopCounterMode(display=False) as counter:
            m(torch.randint(0, 97, (1, 1)), cache=cache)
    update = cfg.ssm.inner(cfg.d_model) * cfg.ssm.d_state if name == "mamba2" else cfg.n_heads * cfg.dh * (cfg.dh + 1)
    assert counter.get_total_flops() == decode_flops_per_token(cfg, 5) - 2 * cfg.n_layers * update


@pytest.mark.parametrize("name", ["mamba2", "linear"])
def test_chunked_prefill_flops_equal_flop_counter(name):
    """A full sequence in the chunked form (T = 10 over chunks of 4: a padded last chunk): projections and
    convolution per token plus the chunked scan's matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    from llmarch.nn.attention import AttnContext

    cfg = llmarch.ModelConfig(**CONFIGS[name])
    mixer = llmarch.build(cfg).decoder.layers[0].attn
    B, T = 2, 10
    x = torch.randn(B, T, cfg.d_model)
    ctx = AttnContext(0, T, llmarch.build(cfg).decoder.positions, torch.arange(T).expand(B, T), None, causal=True,
                      device=x.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mixer(x, ctx)
    cost = MIXER_COSTS[cfg.mixer]
    assert counter.get_total_flops() == 2 * B * T * cost.proj_macs(cfg) + 2 * cost.mixing_macs(cfg, B, T)
