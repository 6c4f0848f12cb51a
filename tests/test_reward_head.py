"""The last_token head (a reward model's scalar score): parity with transformers' *ForSequenceClassification for
llama, mistral, qwen2 and gpt2 on left- and right-padded batches, save reloading in transformers, the padded
score equal to each sequence scored alone, the analysis count, and a LoRA adapter on the score through peft."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.analysis.params import count_params
from llmarch.hf.io import family
from tests.hf_util import TOL, hf_logits, make_hf_model

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, head="last_token",
            pad_token_id=0)
CASES = {
    "llama": llmarch.preset("llama-tiny").replace(**BASE, n_kv_heads=2, n_labels=1),
    "mistral": llmarch.preset("mistral-tiny").replace(**BASE, n_kv_heads=2, n_labels=1, window=4),
    "qwen2": llmarch.preset("qwen2-tiny").replace(**BASE, n_kv_heads=2, n_labels=3),
    "gpt2": llmarch.preset("gpt2-tiny").replace(**BASE, n_labels=1),
}
CLASSES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


def _batch(vocab: int, lengths=(9, 5, 2), left: bool = True, seed: int = 4):
    """Rows of real tokens (never the pad id 0), padded on the left or the right with 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1 if left else 0
        mask[i, :n] = mask[i, :n] if left else 1
    return ids.masked_fill(mask == 0, 0), mask


def _hf_pair(case, tmp):
    cfg = CASES[case]
    head = family(case).score_head_to_hf(cfg, {})  # architectures + labels, from the production translator
    hf_model, path = make_hf_model(cfg, case, tmp, model_class=CLASSES[case], **head)
    return cfg, hf_model, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_match_transformers_and_save_reloads(case, tmp_path):
    import transformers

    cfg, hf_model, path = _hf_pair(case, tmp_path)
    ours = llmarch.hf.load(path).eval()
    assert ours.config == cfg
    for left in (True, False):
        ids, mask = _batch(cfg.vocab_size, left=left)
        with torch.no_grad():
            mine = ours(ids, attention_mask=mask).logits
        assert mine.shape == (3, cfg.n_labels)
        assert (mine - hf_logits(hf_model, ids, mask)).abs().max() <= TOL[torch.float32], f"left={left}"
    out = llmarch.hf.save(ours, tmp_path / "saved")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == CLASSES[case]
    ids, mask = _batch(cfg.vocab_size, left=True, seed=7)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert (mine - hf_logits(reloaded, ids, mask)).abs().max() <= TOL[torch.float32]


@pytest.mark.parametrize("pad_token_id", [0, None])
def test_padded_score_equals_each_sequence_alone(pad_token_id):
    """The head reads each row's last real token: from the pad id, or without one from the attention mask."""
    cfg = CASES["llama"].replace(pad_token_id=pad_token_id, n_labels=2)
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    for left in (True, False):
        ids, mask = _batch(cfg.vocab_size, left=left, seed=9)
        with torch.no_grad():
            batched = model(ids, attention_mask=mask).logits
            alone = torch.cat([model(ids[i][mask[i].bool()][None]).logits for i in range(3)])
        assert torch.allclose(batched, alone, atol=1e-5), f"left={left}"


def test_config_and_analysis():
    cfg = CASES["qwen2"]
    model = llmarch.build(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    assert count_params(cfg).components["head"] == cfg.d_model * cfg.n_labels
    with pytest.raises(ValueError, match="head"):
        llmarch.preset("t5-tiny").replace(head="last_token")
    with pytest.raises(ValueError, match="head"):
        CASES["llama"].replace(head="mlm")
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        bloom = llmarch.preset("bloom-tiny").replace(head="last_token", n_labels=1, n_layers=1, vocab_size=97)
        llmarch.hf.save(llmarch.build(bloom), "/nonexistent/never-written", model_type="bloom")


def test_reward_adapter_with_trained_score_both_ways(tmp_path):
    """A LoRA reward model whose new score trains in full (``trainable=("head",)``): saved as PEFT's
    modules_to_save, it loads in peft on the SequenceClassification model; a peft SEQ_CLS adapter loads in ours."""
    import peft
    import transformers

    from llmarch import lora

    cfg, hf_model, path = _hf_pair("llama", tmp_path)
    ours = lora.apply(llmarch.hf.load(path).eval(), r=2, alpha=4, targets=("q", "down"), trainable=("head",))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    adapter = llmarch.hf.save_adapter(ours, tmp_path / "adapter")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert (mine - hf_logits(hf_model, ids, mask)).abs().max() > 1e-3  # adapters and score both moved
    assert (mine - hf_logits(theirs, ids, mask)).abs().max() <= TOL[torch.float32]

    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj"],
                                                                task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = llmarch.hf.load_adapter(llmarch.hf.load(path).eval(), tmp_path / "peft")
    assert lora.settings(loaded)["targets"] == ["v"] and lora.settings(loaded)["trainable"] == ["head"]
    with torch.no_grad():
        assert (loaded(ids, attention_mask=mask).logits - hf_logits(peft_model.eval(), ids, mask)).abs().max() \
            <= TOL[torch.float32]
