"""PEFT interop of LoRA adapters, both ways, for a llama-family model (q/k/v and gate/up are separate modules in
transformers, fused in ours), GPT-2 (q/k/v fused in both, as one Conv1D ``c_attn`` there) and DeepSeek-V2's latent
attention (its kv down projection holds [latent | rope key] rows, mapped by the same probe): our adapters saved
with llmarch.hf.save_adapter load in peft on the model llmarch.hf.save wrote and give the same logits; an adapter
made with peft on the transformers model loads into ours with the same logits (fp32, padded batch)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch import lora
from tests.hf_util import assert_close_at, hf_logits, make_hf_model, padded_batch

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64)
CASES = {
    "llama": ("llama", llmarch.preset("llama-tiny").replace(**BASE, n_kv_heads=2),
              ("q", "v", "o", "gate", "down", "head"),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": ("gpt2", llmarch.preset("gpt2-tiny").replace(**BASE), ("q", "v", "o", "up"),
             ["c_attn", "c_proj", "c_fc"]),
    "deepseek_v2": ("deepseek_v2", llmarch.preset("deepseek-v2-tiny").replace(
        **BASE, mla=dict(q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=6, v_head_dim=10),
        moe=dict(n_experts=4, top_k=2, d_ff=16, n_shared=1)), ("q_a", "q_b", "kv_a", "kv_b", "o"),
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
}


def _randomise(module, names=("lora_B",), seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ours_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_in_peft(case, tmp_path):
    import peft
    import transformers

    model_type, cfg, targets, _ = CASES[case]
    _, hf_dir = make_hf_model(cfg, model_type, tmp_path)
    ours = llmarch.hf.load(hf_dir).eval()
    saved = llmarch.hf.save(ours, tmp_path / "saved")
    lora.apply(ours, r=4, alpha=8, targets=targets)
    _randomise(ours)
    out = llmarch.hf.save_adapter(ours, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    ids, mask = padded_batch(cfg.vocab_size, lengths=(11, 6, 3))
    mine = _ours_logits(ours, ids, mask)
    assert (mine - _ours_logits(llmarch.hf.load(saved), ids, mask)).abs().max() > 1e-3  # the adapter matters
    assert_close_at(mine, hf_logits(theirs, ids, mask), mask)
    again = llmarch.hf.load_adapter(llmarch.hf.load(saved).eval(), out)  # and back into ours
    assert_close_at(_ours_logits(again, ids, mask), mine, mask)
    # a fused checkpoint module (c_attn) comes back as adapters on all of q, k and v: same update, rank 2r
    fused = {"gpt2": ["q", "k", "v", "o", "up"]}.get(case, list(targets))
    assert sorted(lora.settings(again)["targets"]) == sorted(fused)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_ours(case, tmp_path):
    import peft

    model_type, cfg, _, modules = CASES[case]
    hf_model, hf_dir = make_hf_model(cfg, model_type, tmp_path)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, use_rslora=case == "llama",
                             rank_pattern={modules[0]: 6}, alpha_pattern={modules[-1]: 3})
    theirs = peft.get_peft_model(hf_model, config).eval()
    _randomise(theirs, ("lora_A", "lora_B"))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = llmarch.hf.load_adapter(llmarch.hf.load(hf_dir).eval(), tmp_path / "adapter")
    assert all(".adapters." in n for n, p in ours.named_parameters() if p.requires_grad)
    ids, mask = padded_batch(cfg.vocab_size, lengths=(11, 6, 3))
    mine = _ours_logits(ours, ids, mask)
    with theirs.disable_adapter():
        assert (mine - hf_logits(theirs, ids, mask))[mask.bool()].abs().max() > 1e-3  # the adapter matters
    assert_close_at(mine, hf_logits(theirs, ids, mask), mask)
    with lora.disabled(ours), theirs.disable_adapter():
        assert_close_at(_ours_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)


def test_adapter_errors_name_the_cause(tmp_path):
    cfg = llmarch.preset("mixtral-tiny").replace(**BASE, n_kv_heads=2)
    model = llmarch.build(cfg)
    with pytest.raises(ValueError, match="no adapters"):
        llmarch.hf.save_adapter(model, tmp_path / "a")
    lora.apply(model, targets=("q", "experts.up"))
    with pytest.raises(ValueError, match="experts"):
        llmarch.hf.save_adapter(model, tmp_path / "a")
    tied = lora.apply(llmarch.build(CASES["gpt2"][1]), targets=("head",))
    with pytest.raises(ValueError, match="tied"):
        llmarch.hf.save_adapter(tied, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
