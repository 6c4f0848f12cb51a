"""Parity with transformers' Qwen3-Next (hybrid gated delta + gated attention, MoE with a gated shared expert), on
its torch fallback path: logits on a left-padded batch, greedy generation (prefill through the chunked form, decode
through the recurrent form and the conv state), save round trip; and the 80B preset's exact parameter count."""
from __future__ import annotations

import pytest
import torch

import llmarch
from tests.hf_util import (causal_pair, check_config_round_trip, check_greedy_generation, check_padded_logits,
                           check_save_reloads)
from tests.test_hf_moe import sharpen_routers

BASE = dict(vocab_size=211, d_model=48, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, max_seq_len=128,
            linear=dict(n_k_heads=2, n_v_heads=4, k_head_dim=16, v_head_dim=8, conv_kernel=4),
            moe=dict(n_experts=4, top_k=2, d_ff=32, shared_d_ff=48))
CASES = {
    "qwen3-next": llmarch.preset("qwen3-next-tiny").replace(**BASE),
    "qwen3-next-dense-bias": llmarch.preset("qwen3-next-tiny").replace(
        **{**BASE, "n_layers": 2, "moe": None, "linear": dict(n_k_heads=4, n_v_heads=4, k_head_dim=8, v_head_dim=8,
                                                            conv_kernel=3)},
        ffn="glu", qkv_bias=True, out_bias=True, layer_mixers=("gated_delta", "gated_attention")),
}


def prepare(model, path):
    """Sharp routers (no near-ties), and slow decays: transformers draws A in [0.01, 16], so most heads forget
    everything within a token or two and a wrong state would hardly show; A in [0.01, 0.3] keeps the state alive."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.01, 0.3).log())
    sharpen_routers(model, path)


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    return causal_pair(request.param, "qwen3_next", CASES[request.param], tmp_path_factory.mktemp(request.param),
                       prepare=prepare)


def test_config_round_trips(pair):
    check_config_round_trip(pair)


def test_logits_match_on_padded_batch(pair):
    check_padded_logits(pair)


def test_greedy_generation_matches(pair):
    check_greedy_generation(pair)


def test_save_reloads_in_transformers(pair):
    check_save_reloads(pair)


def test_80b_preset_counts_like_transformers():
    """The preset, translated to a transformers config, builds (on the meta device) a model with exactly our
    parameter count; and the translation reads back to the preset."""
    import transformers

    from llmarch.hf.io import family

    cfg = llmarch.preset("qwen3-next-80b-a3b")
    hf_cfg = family("qwen3_next").from_config(cfg)
    assert family("qwen3_next").to_config(hf_cfg) == cfg
    config = transformers.Qwen3NextConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    with torch.device("meta"):
        theirs = transformers.Qwen3NextForCausalLM(config)
    ours = llmarch.build(cfg, device="meta")
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_theirs
    assert 79e9 < n_theirs < 82e9  # "80B total" on the model card


def test_multi_token_prediction_tensors_are_ignored(pair, tmp_path):
    """Released checkpoints carry an MTP head (``mtp.*``) that transformers does not run: loading skips it by
    name, and still refuses any other stray tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmarch.hf import ConversionError
    from tests.hf_util import assert_same_weights

    _, _, _, _, ours, tmp = pair
    src = tmp / "hf"
    for extra, ok in (("mtp.fc.weight", True), ("model.layers.0.stray.weight", False)):
        d = tmp_path / extra
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
        tensors = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
        save_file({**tensors, extra: torch.zeros(3, 3)}, d / "model.safetensors")
        if ok:
            assert_same_weights(llmarch.hf.load(d), ours)
        else:
            with pytest.raises(ConversionError, match="stray"):
                llmarch.hf.load(d)
