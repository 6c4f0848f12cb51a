"""Parity with transformers for the MoE families (mixtral, qwen2_moe): logits on a padded batch, greedy
generation, save round trip; and layer-level parity with Switch Transformers' sparse MLP (top-1 routing with
expert capacity; the full model is held to transformers in tests/test_hf_switch.py)."""
from __future__ import annotations

import pytest
import torch
import transformers

import llmarch
from llmarch.hf import ConversionError
from tests.hf_util import assert_close_at, hf_logits, make_hf_model, padded_batch

BASE = dict(vocab_size=211, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128)
CASES = {
    "mixtral": ("mixtral", llmarch.preset("mixtral-tiny").replace(**BASE)),
    "mixtral-top1-window": ("mixtral", llmarch.preset("mixtral-tiny").replace(
        **BASE, pattern=("sliding",), window=5, moe=dict(n_experts=3, top_k=1))),
    "qwen2-moe": ("qwen2_moe", llmarch.preset("qwen2-moe-tiny").replace(**BASE)),
    "qwen2-moe-schedule-norm": ("qwen2_moe", llmarch.preset("qwen2-moe-tiny").replace(
        **{**BASE, "n_layers": 4}, moe=dict(every=2, offset=1, first_dense=2, router="softmax_topk_norm", top_k=3))),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine a second thread waits its turn."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    tmp = tmp_path_factory.mktemp(request.param)
    hf_model, path = make_hf_model(cfg, model_type, tmp)
    sharpen_routers(hf_model, path)
    ours = llmarch.hf.load(path).eval()
    return request.param, model_type, cfg, hf_model, ours, tmp


def test_config_round_trips(pair):
    _, _, cfg, _, ours, _ = pair
    assert ours.config == cfg


def test_logits_match_on_padded_batch(pair):
    name, _, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(14, 9, 3))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask), mask)


def test_greedy_generation_matches(pair):
    name, _, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(6, 4), seed=3)
    hf_out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    mine = llmarch.generate(ours, ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(mine, hf_out), f"{name}: generations differ\n{mine}\n{hf_out}"


def test_save_reloads_in_transformers(pair):
    name, model_type, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model_type
    ids, mask = padded_batch(cfg.vocab_size, lengths=(10, 5))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(reloaded, ids, mask), mask)
    again = llmarch.hf.load(out)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


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
