"""Every preset with a published parameter count builds (on the meta device) to exactly that count, and the newest
seed presets equal the transformers model of the same architecture."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.presets import PUBLISHED_PARAMS

llmarch.presets.names()  # registers every preset (and its published count)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied tensor is yielded once


def test_published_counts_cover_the_seed_presets():
    assert {"gpt-1", "llama-2-34b", "llama-3.1-405b", "switch-c-2048", "gpt2", "llama-2-7b", "mixtral-8x7b",
            "qwen2-7b", "t5-11b"} <= set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_every_published_count_is_exact(name):
    assert count(llmarch.build(llmarch.preset(name), device="meta")) == PUBLISHED_PARAMS[name]


def _hf_meta_count(config) -> int:
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    return count(model)


def test_gpt1_and_switch_c_equal_transformers():
    from transformers import OpenAIGPTConfig, SwitchTransformersConfig

    gpt1 = OpenAIGPTConfig(architectures=["OpenAIGPTLMHeadModel"])  # the released openai-gpt sizes are the defaults
    assert _hf_meta_count(gpt1) == count(llmarch.build(llmarch.preset("gpt-1"), device="meta"))
    # transformers builds 2048 expert modules per layer slowly; the count is affine in the expert count, so compare
    # the same architecture at 2 and 3 experts and extrapolate to 2048
    ours, theirs = [], []
    for n in (2, 3):
        cfg = llmarch.preset("switch-c-2048")
        ours.append(count(llmarch.build(cfg.replace(moe={"n_experts": n}), device="meta")))
        theirs.append(_hf_meta_count(SwitchTransformersConfig(
            d_model=2080, d_ff=6144, d_kv=64, num_heads=32, num_layers=15, num_decoder_layers=15, num_experts=n,
            encoder_sparse_step=1, decoder_sparse_step=1, architectures=["SwitchTransformersForConditionalGeneration"])))
    assert ours == theirs
    assert theirs[0] + (theirs[1] - theirs[0]) * (2048 - 2) == PUBLISHED_PARAMS["switch-c-2048"]


def test_speculated_gpt4_follows_the_seed_numbers():
    cfg = llmarch.preset("gpt4-speculated")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.max_seq_len) == (120, 12288, 96, 32768)
    assert (cfg.moe.n_experts, cfg.moe.top_k) == (16, 2)
    assert "gpt4-speculated" not in PUBLISHED_PARAMS  # a speculation has no published count
