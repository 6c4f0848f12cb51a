"""Conditioned generation (seed 002): a style id through an embedding, fused by addition or adaptive norm.
Different conditions change the output, the same condition reproduces it, cached decoding equals the full
forward, and a fresh adaptive norm (zero-initialised modulation) is exactly its unconditioned model."""
import pytest
import torch

import llmarch

NAMES = ["llama-tiny-style", "llama-tiny-adanorm"]


def built(name):
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset(name)).eval()
    if model.modulation is not None:  # open the adaptive norm so the condition acts
        torch.nn.init.normal_(model.modulation.weight, std=1.0)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_conditions_change_the_output_and_the_same_one_reproduces_it(name):
    model = built(name)
    ids = torch.randint(0, 2048, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, again, b = (model(ids, style=s).logits for s in (torch.tensor([0, 1]), torch.tensor([0, 1]), 2))
    assert torch.equal(a, again)
    assert (a - b).abs().amax(dim=(1, 2)).min() > 1e-3  # every row changes
    g1 = llmarch.generate(model, ids, max_new_tokens=6, style=3)
    assert torch.equal(g1, llmarch.generate(model, ids, max_new_tokens=6, style=3))
    assert not torch.equal(g1, llmarch.generate(model, ids, max_new_tokens=6, style=0))


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_keeps_the_condition(name):
    model = built(name)
    ids = torch.randint(0, 2048, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, style=1).logits
        cache = model.new_cache()
        model(ids[:, :5], style=1, cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache).logits[:, -1] for t in range(5, 8)]
    assert (torch.stack(steps, 1) - full[:, 5:]).abs().max() <= 1e-4


def test_fresh_adaptive_norm_is_the_base_model_and_style_is_required():
    torch.manual_seed(0)
    cfg = llmarch.preset("llama-tiny-adanorm")
    model = llmarch.build(cfg).eval()
    base = llmarch.build(cfg.replace(condition=None)).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    ids = torch.randint(0, 2048, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids, style=torch.tensor([0, 3])).logits, base(ids).logits)
    with pytest.raises(ValueError, match="style"):
        model(ids)
    with pytest.raises(ValueError, match="n_styles"):
        model(ids, style=4)


def test_generate_style_from_the_cli(capsys):
    from llmarch.cli import main

    outs = []
    for style in (0, 0, 2):
        assert main(["generate", "--preset", "llama-tiny-style", "--prompt", "5 6 7", "--style", str(style),
                     "--max-new-tokens", "6", "--temperature", "0", "--no-stream"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_hf_save_refuses_a_conditioned_model(tmp_path):
    model = llmarch.build(llmarch.preset("llama-tiny-style"))
    with pytest.raises(ValueError, match="condition"):
        llmarch.hf.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
