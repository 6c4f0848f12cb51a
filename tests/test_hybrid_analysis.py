"""The analysis of hybrid models: parameter counts equal the built model, forward FLOPs equal torch's flop counter
(the readable attention kernel, dense FFNs), and the decoding memory splits into a per-token KV cache (attention
layers only) and a constant recurrent state, both equal to what a real StateCache holds."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llmarch
from llmarch.analysis import memory as M
from llmarch.analysis.flops import forward_flops
from llmarch.analysis.params import count_params, meta_param_count

HYBRID = ("gated_delta", "gated_delta", "gated_delta", "gated_attention")
SCHEDULES = {"hybrid-3-1": HYBRID, "all-delta": ("gated_delta",), "all-gated-attention": ("gated_attention",)}


def tiny(schedule, **changes):
    return llmarch.preset("qwen3-next-tiny").replace(layer_mixers=schedule, **changes)


@pytest.mark.parametrize("name", SCHEDULES)
def test_params_equal_the_built_model(name):
    cfg = tiny(SCHEDULES[name], qkv_bias=True, out_bias=True)
    assert count_params(cfg).total == meta_param_count(cfg)


@pytest.mark.parametrize("name", SCHEDULES)
def test_forward_flops_equal_the_flop_counter(name):
    """T = 50 is not a multiple of the chunk (32 here): the padded tail chunk is counted as the kernel runs it."""
    cfg = tiny(SCHEDULES[name], ffn="glu", moe=None, attn_kernel="naive", linear=dict(chunk_size=32))
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 50))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    assert counter.get_total_flops() == forward_flops(cfg, 50, 2).forward


def test_state_is_constant_and_matches_the_cache():
    cfg = tiny(HYBRID)
    model = llmarch.build(cfg).eval()
    sizes = []
    for T in (5, 40):
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (2, T)), cache=cache)
        state = sum(t.numel() * t.element_size() for d in (cache.conv, cache.state) for t in d.values())
        assert state == M.state_bytes(cfg, batch=2, dtype="fp32")
        assert cache.nbytes() - state == M.kv_cache_bytes(cfg, T, batch=2, dtype="fp32")
        sizes.append(state)
    assert sizes[0] == sizes[1]
    # only the one attention layer in four grows with the context
    assert M.kv_bytes_per_token(cfg, "bf16") == 2 * cfg.kv_heads * cfg.dh * 2 * cfg.n_layers // 4
    mem = M.inference_memory(cfg, 1000, dtype="bf16")
    assert mem["recurrent_state"] == M.state_bytes(cfg, dtype="bf16") > 0


def test_cli_shows_the_schedule_state_and_picture(tmp_path, capsys):
    from llmarch.analysis.diagram import architecture
    from llmarch.cli import main

    cfg = llmarch.preset("qwen3-next-80b-a3b")
    assert architecture(cfg).schedule == [cfg.layer_mixer(i) for i in range(48)]
    assert main(["inspect", "qwen3-next-80b-a3b", "--seq-len", "32768"]) == 0
    out = capsys.readouterr().out
    assert "layer schedule: gated_delta×3 + gated_attention (×12)" in out
    assert f"recurrent state: {M.state_bytes(cfg) / 2**20:.2f} MiB" in out and "768.00 MiB for 1 × 32768" in out
    assert main(["compare", "qwen3-next-tiny", "llama-tiny"]) == 0
    assert "recurrent state (any context)" in capsys.readouterr().out
    assert main(["diagram", "qwen3-next-tiny", "-o", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 10_000
