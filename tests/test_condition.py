"""Conditioned generation (seed 002): a style id through an embedding, or an instruction through an encoder stack
(mean-pooled over non-pad tokens), fused by addition, adaptive norm or a fusion layer. Different conditions change
the output, the same condition reproduces it, cached decoding equals the full forward, and a fresh adaptive norm
(zero-initialised modulation) or fusion layer ([I | 0]) is exactly its unconditioned model."""
import pytest
import torch

import llmarch

NAMES = ["llama-tiny-style", "llama-tiny-adanorm"]


def built(name):
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset(name)).eval()
    fusion = model.condition_fusion
    if hasattr(fusion, "modulation"):  # open the adaptive norm so the condition acts
        torch.nn.init.normal_(fusion.modulation.weight, std=1.0)
    if hasattr(fusion, "proj"):  # open the fusion layer's condition half
        with torch.no_grad():
            fusion.proj.weight[:, model.config.d_model:].normal_(std=1.0)
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


def fresh_and_base(name):
    """A freshly built conditioned model and its unconditioned decoder with the same weights."""
    torch.manual_seed(0)
    cfg = llmarch.preset(name)
    model = llmarch.build(cfg).eval()
    base = llmarch.build(cfg.replace(condition=None)).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    return model, base


def test_fresh_adaptive_norm_is_the_base_model_and_style_is_required():
    model, base = fresh_and_base("llama-tiny-adanorm")
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


def test_generate_instruction_from_the_cli(capsys):
    from llmarch.cli import main

    outs = []
    for inst in ("5 6", "5 6", "9 10 11"):
        assert main(["generate", "--preset", "llama-tiny-instruct", "--prompt", "5 6 7", "--instruction", inst,
                     "--max-new-tokens", "4", "--temperature", "0", "--no-stream"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # (a fresh fusion layer is the identity: instructions act once it trains)
    assert main(["generate", "--preset", "llama-tiny-instruct", "--prompt", "5", "--instruction", " "]) != 0
    assert "--instruction: the instruction is empty" in capsys.readouterr().err


def test_hf_save_refuses_a_conditioned_model(tmp_path):
    model = llmarch.build(llmarch.preset("llama-tiny-style"))
    with pytest.raises(ValueError, match="condition"):
        llmarch.hf.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def instructions(*rows, pad=0):
    """Right-padded instruction ids and their mask."""
    S = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (S - len(r)) for r in rows])
    return ids, torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows])


def test_instructions_change_the_output_and_the_same_one_reproduces_it():
    model = built("llama-tiny-instruct")
    ids = torch.randint(0, 2048, (2, 9), generator=torch.Generator().manual_seed(3))
    a_ids, a_mask = instructions([5, 6, 7], [8, 9])
    b_ids, b_mask = instructions([10, 11], [12, 13, 14, 15])
    with torch.no_grad():
        a, again = (model(ids, instruction=a_ids, instruction_mask=a_mask).logits for _ in range(2))
        b = model(ids, instruction=b_ids, instruction_mask=b_mask).logits
    assert torch.equal(a, again)
    assert (a - b).abs().amax(dim=(1, 2)).min() > 1e-3
    g1 = llmarch.generate(model, ids, max_new_tokens=5, instruction=a_ids[:, :2])
    assert torch.equal(g1, llmarch.generate(model, ids, max_new_tokens=5, instruction=a_ids[:, :2]))
    assert not torch.equal(g1, llmarch.generate(model, ids, max_new_tokens=5, instruction=b_ids[:, :2]))


def test_instruction_is_pooled_over_non_pad_tokens_of_the_encoder_stack():
    model = built("llama-tiny-instruct")
    ids, mask = instructions([5, 6, 7], [8, 9])
    padded = torch.cat([ids, torch.full((2, 3), 11)], 1)  # 3 more pad slots (any id: the mask says pad)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1)
    with torch.no_grad():
        c = model.condition(2, None, ids, mask)
        assert (model.condition(2, None, padded, padded_mask) - c).abs().max() <= 1e-5
        states = [model._run(model.instruction, torch.tensor([r]), None, None, None, None, None)[0]
                  for r in ([5, 6, 7], [8, 9])]  # each row alone, no padding at all
    naive = torch.stack([s.mean(0) for s in states])
    assert (c - naive).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="instruction_mask"):
        model.condition(2, None, ids, torch.zeros_like(mask))


def test_fresh_fusion_layer_is_the_base_model_and_caches_the_condition():
    model, base = fresh_and_base("llama-tiny-instruct")
    ids = torch.randint(0, 2048, (2, 8))
    inst, mask = instructions([5, 6, 7], [8, 9])
    with torch.no_grad():
        assert (model(ids, instruction=inst, instruction_mask=mask).logits - base(ids).logits).abs().max() <= 1e-6
        opened = built("llama-tiny-instruct")
        full = opened(ids, instruction=inst, instruction_mask=mask).logits
        cache = opened.new_cache()
        opened(ids[:, :5], instruction=inst, instruction_mask=mask, cache=cache)
        steps = [opened(ids[:, t:t + 1], cache=cache).logits[:, -1] for t in range(5, 8)]
    assert (torch.stack(steps, 1) - full[:, 5:]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="instruction="):
        model(ids)
    with pytest.raises(ValueError, match="style: this model has no style table"):
        model(ids, style=0)


def test_condition_config_needs_a_source_and_a_known_fusion():
    from llmarch.config import ConditionConfig

    with pytest.raises(ValueError, match="condition: needs a source"):
        ConditionConfig(n_styles=0)
    with pytest.raises(ValueError, match="condition.fusion"):
        ConditionConfig(fusion="concat")
    with pytest.raises(ValueError, match="condition.instruction_layers"):
        ConditionConfig(instruction_layers=-1)
