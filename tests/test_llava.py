"""LLaVA exact vs transformers' LlavaForConditionalGeneration (tiny, random, llama text): logits on images + padded
text, greedy generation with images, save round trip; and for both fusions, cached decoding with images equals
the full forward, and the defining property of each (projector: image tokens take the image; gated
cross-attention: gates at zero leave the text model unchanged)."""
import math

import pytest
import torch

import llmarch
from tests.hf_util import TOL, assert_close_at, assert_same_weights, make_hf_model

PRE, POST = (3, 2), (5, 3)  # text tokens before / after the image, per row


def multimodal_batch(cfg, seed: int = 0):
    """Left-padded rows [text, image tokens x N, text] of different lengths, their mask and one image per row."""
    v = cfg.vision
    g = torch.Generator().manual_seed(seed)
    image_id = v.image_token_id if v.image_token_id is not None else cfg.vocab_size - 1
    rows = [torch.cat([torch.randint(0, image_id, (a,), generator=g), torch.full((v.image_tokens,), image_id),
                       torch.randint(0, image_id, (b,), generator=g)]) for a, b in zip(PRE, POST)]
    if v.fusion != "projector":  # no image tokens: the image reaches the text through cross-attention
        rows = [r[r != image_id] for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    pixels = torch.randn(len(rows), v.channels, v.image_size, v.image_size, generator=g)
    return ids, mask, pixels


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = llmarch.preset("llava-tiny")
    tmp = tmp_path_factory.mktemp("llava")
    hf_model, path = make_hf_model(cfg, "llava", tmp, model_class="LlavaForConditionalGeneration")
    return cfg, hf_model, llmarch.hf.load(path).eval(), tmp


def hf_logits(model, ids, mask, pixels):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pixels).logits


def test_config_round_trip(pair):
    cfg, _, ours, _ = pair
    assert ours.config == cfg


def test_logits_match_on_images_and_padded_text(pair):
    cfg, hf_model, ours, _ = pair
    ids, mask, pixels = multimodal_batch(cfg)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, pixel_values=pixels).logits
        other_image = ours(ids, attention_mask=mask, pixel_values=pixels.flip(0)).logits
    assert_close_at(mine, hf_logits(hf_model, ids, mask, pixels), mask)
    last = mask.shape[1] - 1
    assert (mine[:, last] - other_image[:, last]).abs().max() > 1e-3  # the image matters


def test_greedy_generation_with_images_matches(pair):
    cfg, hf_model, ours, _ = pair
    ids, mask, pixels = multimodal_batch(cfg, seed=3)
    theirs = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    mine = llmarch.generate(ours, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12)
    assert torch.equal(mine, theirs), f"generations differ\n{mine}\n{theirs}"


def test_save_reloads_in_transformers(pair):
    import transformers

    cfg, _, ours, tmp = pair
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, pixels = multimodal_batch(cfg, seed=5)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, pixel_values=pixels).logits
    assert_close_at(mine, hf_logits(reloaded, ids, mask, pixels), mask)
    assert_same_weights(ours, llmarch.hf.load(out))


def test_image_token_count_must_match_the_images(pair):
    cfg, _, ours, _ = pair
    ids, mask, pixels = multimodal_batch(cfg)
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids, attention_mask=mask, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="no image was given"):
        ours(ids, attention_mask=mask)
    text_only = llmarch.build(cfg.replace(vision=None))
    with pytest.raises(ValueError, match="reads text only"):
        text_only(ids, attention_mask=mask, pixel_values=pixels)


@pytest.mark.parametrize("name", ["llava-tiny", "llava-tiny-xattn", "llava-tiny-joint"])
def test_cached_decoding_with_images_equals_full_forward(name):
    torch.manual_seed(0)
    cfg = llmarch.preset(name)
    model = llmarch.build(cfg).eval()
    for m in model.modules():  # open the cross-attention gates so the image reaches the text
        if hasattr(m, "gate"):
            torch.nn.init.constant_(m.gate, 0.7)
    ids, mask, pixels = multimodal_batch(cfg, seed=7)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, pixel_values=pixels).logits
        cache = model.new_cache()
        k = ids.shape[1] - 3
        steps = [model(ids[:, :k], attention_mask=mask[:, :k], pixel_values=pixels, cache=cache).logits[:, -1]]
        for t in range(k, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits[:, -1])
    cached = torch.stack(steps[:-1], dim=1)  # predictions at positions k-1 .. T-2
    assert (cached - full[:, k - 1:-1]).abs().max() <= TOL[torch.float32]
    assert (steps[-1] - full[:, -1]).abs().max() <= TOL[torch.float32]


def test_cross_attention_gates_at_zero_leave_the_text_model_unchanged():
    torch.manual_seed(0)
    cfg = llmarch.preset("llava-tiny-xattn")
    model = llmarch.build(cfg).eval()  # gates start at zero
    text = llmarch.build(cfg.replace(vision=None)).eval()
    own = {k: v for k, v in model.state_dict().items() if k in text.state_dict()}
    text.load_state_dict(own)
    ids, mask, pixels = multimodal_batch(cfg, seed=9)
    with torch.no_grad():
        with_image = model(ids, attention_mask=mask, pixel_values=pixels).logits
        reference = text(ids, attention_mask=mask).logits
        assert torch.equal(with_image[mask.bool()], reference[mask.bool()])
        for m in model.modules():
            if hasattr(m, "gate"):
                torch.nn.init.constant_(m.gate, 0.5)
        opened = model(ids, attention_mask=mask, pixel_values=pixels).logits
    assert (opened - reference)[mask.bool()].abs().max() > 1e-3  # an open gate lets the image in


def test_cross_attention_output_scales_with_tanh_of_the_gate():
    """The first gated layer's output at gates 0.5 and 1.5 (same input: earlier layers do not change) differ by
    tanh(1.5) / tanh(0.5), not by the gates' ratio."""
    from llmarch.nn.vision.fusion import GatedCrossAttention

    torch.manual_seed(0)
    cfg = llmarch.preset("llava-tiny-xattn")
    model = llmarch.build(cfg).eval()
    layer = next(m for m in model.modules() if isinstance(m, GatedCrossAttention))
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(out))
    ids, mask, pixels = multimodal_batch(cfg, seed=9)
    with torch.no_grad():
        for g in (0.5, 1.5):
            torch.nn.init.constant_(layer.gate, g)
            model(ids, attention_mask=mask, pixel_values=pixels)
    small, large = seen[0][mask.bool()], seen[1][mask.bool()]
    assert small.abs().max() > 1e-4
    torch.testing.assert_close(large, small * (math.tanh(1.5) / math.tanh(0.5)), rtol=1e-4, atol=1e-6)
