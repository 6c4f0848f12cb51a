"""LoRA adapters (llmarch.lora): a new adapter (B = 0) leaves the model unchanged, merge equals the unmerged
forward and unmerge restores the weights, only adapter parameters train, disabled() is the base, the fused qkv /
gate_up adapters equal per-projection adapters written out naively here, expert and latent-attention targets,
QLoRA gradients on int8/int4 bases, decoding (dynamic and static cache) after apply and after merge."""
from __future__ import annotations

import copy

import pytest
import torch

import llmarch
from llmarch import lora
from llmarch.infer.quantize import quantize

CFG = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                           max_seq_len=64)
ALL = ("q", "k", "v", "o", "gate", "up", "down", "head")


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return llmarch.build(cfg).eval()


def _ids(vocab=97, shape=(2, 9), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomise(model, seed=2):
    """Non-zero B (a trained adapter), so the tests below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_zero_b_equals_base_and_only_adapters_train():
    model = _model()
    ids = _ids()
    base = _logits(model, ids)
    lora.apply(model, r=4, alpha=8, targets=ALL)
    assert torch.equal(_logits(model, ids), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    assert lora.settings(model) == dict(r=4, alpha=8, dropout=0.0, targets=list(ALL), trainable=[])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(ids).logits
    torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable if "lora_B" in n)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed) or any("lora_B" in n for n in changed)


def _trained_merged(model, ids, base, min_change=1e-3):
    """Give the adapters a non-zero B; check they change the logits, disabled() is the base and the merged model
    equals the unmerged one. Returns the adapted logits; the model is left merged."""
    _randomise(model)
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > min_change
    with lora.disabled(model):
        assert torch.allclose(_logits(model, ids), base, atol=1e-6)
    lora.merge(model)
    assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)
    return adapted


def test_merge_unmerge_disabled():
    model = _model()
    ids = _ids()
    base = _logits(model, ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply(model, r=4, alpha=16, targets=ALL)
    adapted = _trained_merged(model, ids, base)
    with lora.disabled(model):  # a merged model is folded out and back in
        assert torch.allclose(_logits(model, ids), base, atol=1e-5)
    assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)
    lora.unmerge(model)
    for k, v in weights.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)
    lora.merge(model)
    lora.unload(model)  # a plain model again, the update folded in
    assert set(model.state_dict()) == set(weights) and lora.settings(model) is None
    assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)


def test_fused_adapters_equal_naive_per_projection():
    """qkv [q | k | v] and gate_up [gate | up] with adapters on q, v and up only, against y = x W_p^T + s B_p A_p x
    for each projection p computed alone."""
    model = _model()
    lora.apply(model, r=3, alpha=6, targets=("q", "v", "up"))
    _randomise(model)
    attn, ffn = model.decoder.layers[0].attn, model.decoder.layers[0].ffn
    assert sorted(attn.qkv.adapters) == ["q", "v"] and sorted(ffn.gate_up.adapters) == ["up"]
    x = torch.randn(2, 5, 32)
    H, G, Dh, F = 4, 2, 8, 48
    W = attn.qkv.weight
    Wq, Wk, Wv = W.split([H * Dh, G * Dh, G * Dh])

    def naive(x, w, adapter):
        y = x @ w.T
        if adapter is not None:
            y = y + (x @ adapter.lora_A.T @ adapter.lora_B.T) * (6 / 3)
        return y

    with torch.no_grad():
        want = torch.cat([naive(x, Wq, attn.qkv.adapters["q"]), naive(x, Wk, None),
                          naive(x, Wv, attn.qkv.adapters["v"])], -1)
        assert torch.allclose(attn.qkv(x), want, atol=1e-6)
        Wg, Wu = ffn.gate_up.weight.split([F, F])
        want = torch.cat([naive(x, Wg, None), naive(x, Wu, ffn.gate_up.adapters["up"])], -1)
        assert torch.allclose(ffn.gate_up(x), want, atol=1e-6)


def test_generate_after_apply_and_merge_static_and_dynamic():
    model = _model()
    lora.apply(model, r=4, alpha=8, targets=ALL)
    _randomise(model)
    ids = _ids(shape=(2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    ref = llmarch.generate(model, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(llmarch.generate(model, ids, attention_mask=mask, max_new_tokens=6, cache="static"), ref)
    full = ref.clone()  # greedy tokens are the argmax of a plain forward over the generated sequence
    logits = _logits(model, full, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1))
    assert torch.equal(logits[:, 4:-1].argmax(-1), full[:, 5:])
    lora.merge(model)
    assert torch.equal(llmarch.generate(model, ids, attention_mask=mask, max_new_tokens=6, cache="static"), ref)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_gradients_reach_adapters_only(mode):
    cfg = CFG.replace(d_model=64, d_ff=128)
    model = quantize(_model(cfg), mode, group_size=32)
    ids = _ids()
    base = _logits(model, ids)
    lora.apply(model, r=4, alpha=8, targets=("q", "v", "down"))
    assert torch.equal(_logits(model, ids), base)
    model.train()
    loss = model(ids).logits.logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".adapters." in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(b.grad is None for b in model.buffers())
    with pytest.raises(ValueError, match="quantized"):
        lora.merge(model)
    model.eval()
    assert llmarch.generate(model, ids[:, :4], max_new_tokens=3).shape == (2, 7)


MOE = llmarch.preset("mixtral-tiny").replace(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            d_ff=24, max_seq_len=64)
MLA = llmarch.preset("deepseek-v2-tiny").replace(vocab_size=97, n_layers=2, max_seq_len=64)


@pytest.mark.parametrize("cfg,target", [(MOE, t) for t in ("experts.gate", "experts.up", "experts.down")]
                         + [(MLA.replace(mla=dict(q_lora_rank=16)), t) for t in ("q_a", "q_b", "kv_a", "kv_b")]
                         + [(MLA.replace(mla=dict(q_lora_rank=None)), "q")])
def test_expert_and_latent_targets(cfg, target):
    """Each target alone changes the model once trained, and merge / disabled() hold for it."""
    model = _model(cfg)
    ids = _ids()
    base = _logits(model, ids)
    lora.apply(model, r=2, alpha=4, targets=(target,))
    assert torch.equal(_logits(model, ids), base)
    adapted = _trained_merged(model, ids, base, min_change=1e-4)
    lora.unmerge(model)
    assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)


def test_expert_adapter_is_per_expert_update():
    """Expert e's weight reads W_e + (alpha / r) A_e^T B_e^T in the bank's [E, in, out] layout."""
    cfg = llmarch.preset("mixtral-tiny").replace(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                 d_ff=24, max_seq_len=64)
    model = _model(cfg)
    bank = next(m for m in model.modules() if hasattr(m, "gate_up") and getattr(m, "n_experts", 0))
    raw = bank.gate_up.detach().clone()
    lora.apply(model, r=2, alpha=4, targets=("experts.up",))
    _randomise(model)
    a = bank.adapters["up"]
    F = cfg.d_ff
    for e in range(bank.n_experts):
        want_up = raw[e, :, F:] + 2.0 * a.lora_A[e].T @ a.lora_B[e].T
        assert torch.allclose(bank.gate_up[e, :, F:], want_up, atol=1e-6)
        assert torch.equal(bank.gate_up[e, :, :F], raw[e, :, :F])


def test_bad_arguments_name_the_field():
    model = _model()
    with pytest.raises(ValueError, match="targets"):
        lora.apply(model, targets=("query",))
    with pytest.raises(ValueError, match="match no projection"):
        lora.apply(model, targets=("experts.up",))
    assert lora.settings(model) is None and not list(lora.adapted(model))
    with pytest.raises(ValueError, match="^r:"):
        lora.apply(model, r=0)
    lora.apply(model, targets="q,v")
    with pytest.raises(ValueError, match="already has adapters"):
        lora.apply(model)
    tied = _model(CFG.replace(tie_embeddings=True))
    lora.apply(tied, targets=("head",))
    with pytest.raises(ValueError, match="tied"):
        lora.merge(tied)


def test_adapter_state_dict_round_trip():
    model = _model()
    lora.apply(model, r=2, alpha=2, targets=("q", "o"))
    _randomise(model)
    state = lora.adapter_state_dict(model)
    assert set(state) == {f"decoder.layers.{i}.attn.{p}.adapters.{t}.lora_{ab}" for i in range(2)
                          for p, t in (("qkv", "q"), ("out", "o")) for ab in "AB"}
    other = lora.apply(_model(), r=2, alpha=2, targets=("q", "o"))
    lora.load_adapter_state_dict(other, state)
    ids = _ids()
    assert torch.equal(_logits(other, ids), _logits(model, ids))
    copy.deepcopy(other)  # adapted models copy (DPO and distillation keep copies)


def test_trainable_projection_trains_in_full():
    """``trainable`` keeps a whole projection trainable (a new reward score) beside the adapters; fused slices
    cannot be."""
    cfg = CFG.replace(head="last_token", n_labels=1)
    model = lora.apply(_model(cfg), r=2, alpha=4, targets=("q",), trainable=("head",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.score.weight" in names and all(".adapters." in n for n in names - {"lm_head.score.weight"})
    assert "lm_head.score.weight" in lora.adapter_state_dict(model)
    assert lora.settings(model)["trainable"] == ["head"]
    plain = _model()
    for bad in (("q",), ("kv_b",)):  # a slice of fused qkv; a projection this model lacks
        with pytest.raises(ValueError, match="trainable"):
            lora.apply(plain, targets=("o",), trainable=bad)
    assert lora.settings(plain) is None and not list(lora.adapted(plain))  # nothing changed
    with pytest.raises(ValueError, match="dropout"):
        lora.apply(_model(MOE), dropout=0.1, targets=("q", "experts.up"))


def test_encoder_decoder_cross_attention_targets():
    """T5: "k" adapts the k rows of self-attention's qkv and of cross-attention's kv ([k | v])."""
    cfg = llmarch.preset("t5-tiny").replace(vocab_size=97, n_layers=1)
    model = _model(cfg)
    ids, dec = _ids(), _ids(seed=3)
    base = _logits(model, ids, decoder_input_ids=dec)
    lora.apply(model, r=2, alpha=4, targets=("k",))
    cross = model.decoder.layers[0].cross
    assert list(cross.kv.adapters) == ["k"] and cross.kv.lora_slots[0][0] == "k"
    _randomise(model)
    adapted = _logits(model, ids, decoder_input_ids=dec)
    assert (adapted - base).abs().max() > 1e-4
    lora.merge(model)
    assert torch.allclose(_logits(model, ids, decoder_input_ids=dec), adapted, atol=1e-5)
