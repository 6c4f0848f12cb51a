"""Shared helpers for parity tests: build a tiny random HF model from our config through the production
translator, save it, load it with llmarch.hf.load, and compare."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import llmarch
from llmarch.hf.io import family

# One tolerance table keyed by dtype (max abs diff on logits).
TOL = {torch.float32: 1e-4}


def make_hf_model(cfg: llmarch.ModelConfig, model_type: str, tmp: Path, seed: int = 0, model_class: str | None = None,
                  **hf_overrides):
    """A randomly initialised transformers model for ``cfg`` (via our translator), saved under ``tmp/hf``.
    ``model_class`` names the transformers class (default: AutoModelForCausalLM)."""
    import transformers

    hf_cfg = family(model_type).from_config(cfg)
    hf_cfg.update(hf_overrides)
    d = tmp / "hf"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_cfg))
    config = transformers.AutoConfig.from_pretrained(d)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    if model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = getattr(transformers, model_class)(config).to(torch.float32)
    with torch.no_grad():  # biases and norm gains are zero/one at init; randomise so they are tested too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(d)
    return model, d


def padded_batch(vocab: int, lengths=(12, 7), seed: int = 1):
    """Left-padded ids [B, T] and attention mask for rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def hf_logits(model, ids, mask, **inputs):
    """HF logits with position ids that skip left padding (what HF generate uses); ``inputs`` go along (images)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **inputs).logits


def assert_close_at(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor, tol: float = TOL[torch.float32]):
    """Max abs diff over real (unpadded) positions."""
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"
    return diff


# --- the four checks every causal-LM family runs (config, logits, greedy generation, save round trip) ----------
# A test module builds its `pair` fixture with `causal_pair(...)` and calls these from thin test functions.


def causal_pair(name: str, model_type: str, cfg: llmarch.ModelConfig, tmp: Path, prepare=None):
    """(name, model_type, cfg, hf_model, ours, tmp): a random HF model for ``cfg`` and ours loaded from it.
    ``prepare(hf_model, path)`` may adjust the HF model (and re-save it) before we load it."""
    hf_model, path = make_hf_model(cfg, model_type, tmp)
    if prepare is not None:
        prepare(hf_model, path)
    return name, model_type, cfg, hf_model, llmarch.hf.load(path).eval(), tmp


def check_config_round_trip(pair) -> None:
    _, _, cfg, _, ours, _ = pair
    assert ours.config == cfg


def check_padded_logits(pair) -> None:
    _, _, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(14, 9, 3))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask), mask)


def check_greedy_generation(pair, new_tokens: int = 20) -> None:
    name, _, cfg, hf_model, ours, _ = pair
    ids, mask = padded_batch(cfg.vocab_size, lengths=(6, 4), seed=3)
    hf_out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    mine = llmarch.generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens)
    assert torch.equal(mine, hf_out), f"{name}: generations differ\n{mine}\n{hf_out}"


def check_save_reloads(pair, explicit_type: bool = False) -> None:
    """hf.save -> transformers.from_pretrained gives the same logits; hf.load of the save gives the same weights."""
    import transformers

    _, model_type, cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved", model_type=model_type if explicit_type else None)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.model_type == model_type
    ids, mask = padded_batch(cfg.vocab_size, lengths=(10, 5))
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
    assert_close_at(mine, hf_logits(reloaded, ids, mask), mask)
    assert_same_weights(ours, llmarch.hf.load(out))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same parameter and buffer names, bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), sorted(set(sa) ^ set(sb))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_seq2seq_greedy_matches(name: str, cfg, hf_model, ours, ids, mask, new_tokens: int = 12) -> None:
    """Greedy generation of an encoder-decoder equals transformers' and is not degenerate (a weak test)."""
    theirs = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               num_beams=1)
    mine = llmarch.generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=cfg.eos_token_id)
    assert torch.equal(mine, theirs), f"{name}: generations differ\n{mine}\n{theirs}"
    assert len(set(mine[:, 1:].flatten().tolist())) > 2, f"{name}: degenerate generations make a weak test: {mine}"
