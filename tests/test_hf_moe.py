"""Parity with transformers for the MoE families (mixtral, qwen2_moe): logits on a padded batch, greedy
generation, save round trip; and layer-level parity with Switch Transformers' sparse MLP (top-1 routing with
expert capacity; the full model is held to transformers in tests/test_hf_switch.py)."""
from __future__ import annotations

import pytest
import torch
import transformers

import llmarch
from llmarch.hf import ConversionError
from tests.hf_util import (causal_pair, check_config_round_trip, check_greedy_generation, check_padded_logits,
                           check_save_reloads, make_hf_model)

BASE = dict(vocab_size=211, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128)
CASES = {
    "mixtral": ("mixtral", llmarch.preset("mixtral-tiny").replace(**BASE)),
    "mixtral-top1-window": ("mixtral", llmarch.preset("mixtral-tiny").replace(
        **BASE, pattern=("sliding",), window=5, moe=dict(n_experts=3, top_k=1))),
    "qwen2-moe": ("qwen2_moe", llmarch.preset("qwen2-moe-tiny").replace(**BASE)),
    "qwen2-moe-schedule-norm": ("qwen2_moe", llmarch.preset("qwen2-moe-tiny").replace(
        **{**BASE, "n_layers": 4}, moe=dict(every=2, offset=1, first_dense=2, router="softmax_topk_norm", top_k=3))),
}




def sharpen_routers(model, path):
    """HF initialises routers with std 0.02, so top-k choices can be near ties; widen them and re-save."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    model_type, cfg = CASES[request.param]
    return causal_pair(request.param, model_type, cfg, tmp_path_factory.mktemp(request.param), prepare=sharpen_routers)


def test_config_round_trips(pair):
    check_config_round_trip(pair)


def test_logits_match_on_padded_batch(pair):
    check_padded_logits(pair)


def test_greedy_generation_matches(pair):
    check_greedy_generation(pair)


def test_save_reloads_in_transformers(pair):
    check_save_reloads(pair)


def test_dense_families_refuse_moe_and_missing_expert_is_named(tmp_path):
    cfg = CASES["mixtral"][1]
    with pytest.raises(ValueError, match="cannot save as 'llama'"):
        llmarch.hf.save(llmarch.build(cfg), tmp_path / "x", model_type="llama")
    _, path = make_hf_model(cfg, "mixtral", tmp_path)
    import json

    hf = json.loads((path / "config.json").read_text())
    hf["num_local_experts"] = 5  # the checkpoint has 4
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConversionError, match=r"block_sparse_moe.experts.4.w1.weight"):
        llmarch.hf.load(path)


@pytest.mark.parametrize("capacity", [2, 64])
def test_switch_sparse_mlp_matches_hf(capacity):
    """Top-1 routing with a per-sequence expert capacity: HF drops overflow tokens in token order and they leave
    the layer as zeros; our switch router + CapacityLimit must agree, dropped tokens included."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from llmarch.hf.switch_transformers import moe_from_hf, sparse_mlp_rules
    from llmarch.hf.convert import to_ours
    from llmarch.nn.moe import MoE

    hf_cfg = transformers.SwitchTransformersConfig(d_model=32, d_ff=48, num_experts=4, expert_capacity=capacity,
                                                   router_bias=False, dense_act_fn="relu")
    torch.manual_seed(0)
    theirs = SwitchTransformersSparseMLP(hf_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    moe = moe_from_hf(hf_cfg.to_dict())
    ours = MoE(32, hf_cfg.d_ff, "relu", moe=moe).eval()
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    state = to_ours(dict(theirs.state_dict()), sparse_mlp_rules("", "", moe), 1, expected)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dropped = ours.stats()["dropped_fraction"].item()
    assert (dropped > 0) == (capacity < 11), dropped  # the small capacity really drops tokens
