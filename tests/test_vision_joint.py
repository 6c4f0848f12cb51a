"""The joint fusion (cross-modal layers over [image features; text]): the scheduled layers equal a naive
single-sequence transformer written here (one softmax over image and text keys, image rows bidirectional among
images, text rows see every image and causal text), other layers see text alone; greedy decoding with images equals
full recomputation; without an image the model is its text model; and it learns the digits task."""
import json

import torch

import llmarch
from tests.hf_util import TOL
from tests.test_llava import multimodal_batch


def joint_config(layers=(0, 2)):
    cfg = llmarch.preset("llava-tiny-joint")
    return cfg.replace(n_layers=3, vision=cfg.vision.replace(cross_layers=layers))


def naive_attention(block, x, pos, allowed, positions):
    """Textbook attention of ``block`` over x [B, S, D]: explicit scores, boolean mask [B, S, S], softmax."""
    a = block.attn
    H, G, Dh = a.n_heads, a.n_kv_heads, a.head_dim
    B, S, _ = x.shape
    qkv = a.qkv(block.attn_norm(x)).view(B, S, H + 2 * G, Dh).transpose(1, 2)
    qk, v = qkv.split([H + G, G], dim=1)
    q, k = positions.rotation(pos).rotate(qk).split([H, G], dim=1)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    scores = (q @ k.transpose(-1, -2)) / Dh ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * Dh)
    h = x + a.out(y)
    return h + block.ffn(block.ffn_norm(h))


def naive_joint_logits(model, ids, mask, pixels):
    """One sequence [image; text] through the scheduled layers, text alone through the others."""
    dec, joint = model.decoder, set(model.config.vision.cross_layers)
    z = model.image_features(pixels)  # [B, N, D]
    B, N, _ = z.shape
    T = ids.shape[1]
    text_pos = N + (mask.cumsum(-1) - 1).clamp(min=0)
    x = model.embed(ids, dec.positions, text_pos)
    causal = torch.ones(T, T).tril().bool()[None] & mask.bool()[:, None, :]  # [B, T, T]
    all_pos = torch.cat([torch.arange(N).expand(B, N), text_pos], dim=1)
    see = torch.zeros(B, N + T, N + T, dtype=torch.bool)
    see[:, :N, :N] = True  # images see images
    see[:, N:, :N] = True  # text sees every image
    see[:, N:, N:] = causal  # and earlier text
    see[:, N:, N:] |= ~causal.any(-1, keepdim=True)  # fully padded query rows: keep the softmax finite
    for i, block in enumerate(dec.layers):
        if i in joint:
            out = naive_attention(block, torch.cat([z, x], dim=1), all_pos, see, dec.positions)
            z, x = out[:, :N], out[:, N:]
        else:
            x = naive_attention(block, x, text_pos, see[:, N:, N:], dec.positions)
    return model.lm_head(dec.final_norm(x))


def test_joint_layers_equal_the_naive_concatenated_sequence():
    torch.manual_seed(0)
    cfg = joint_config()
    model = llmarch.build(cfg).eval()
    ids, mask, pixels = multimodal_batch(cfg, seed=3)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, pixel_values=pixels).logits
        naive = naive_joint_logits(model, ids, mask, pixels)
        text = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - naive)[real].abs().max() <= TOL[torch.float32]
    assert (ours - text)[real].abs().max() > 1e-3  # the image reaches the text


def test_without_an_image_the_joint_model_is_its_text_model():
    torch.manual_seed(1)
    cfg = joint_config()
    model = llmarch.build(cfg).eval()
    text = llmarch.build(cfg.replace(vision=None)).eval()
    text.load_state_dict({k: v for k, v in model.state_dict().items() if k in text.state_dict()})
    ids, mask, _ = multimodal_batch(cfg, seed=4)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, text(ids, attention_mask=mask).logits)


def test_greedy_generation_with_images_equals_full_recomputation():
    """(Cached steps equal the full forward: test_llava's test_cached_decoding_with_images_equals_full_forward.)"""
    torch.manual_seed(2)
    cfg = joint_config((1,))
    model = llmarch.build(cfg).eval()
    ids, mask, pixels = multimodal_batch(cfg, seed=5)
    with torch.no_grad():
        greedy = llmarch.generate(model, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3)
        row = ids
        for _ in range(3):  # the same tokens by full recomputation, no cache
            m = torch.cat([mask, torch.ones(len(ids), row.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
            nxt = model(row, attention_mask=m, pixel_values=pixels).logits[:, -1].argmax(-1)
            row = torch.cat([row, nxt[:, None]], 1)
    assert torch.equal(greedy, row)


def test_joint_layers_must_be_attention_layers():
    import pytest

    cfg = llmarch.preset("llava-tiny-joint")
    with pytest.raises(ValueError, match="vision.cross_layers"):
        cfg.replace(vision=cfg.vision.replace(cross_layers=()))
    with pytest.raises(ValueError, match="vision.cross_layers"):
        cfg.replace(layer_mixers=("attention", "linear"))


def test_joint_fusion_learns_the_digits_task(tmp_path, monkeypatch):
    from llmarch.cli import main
    from llmarch.train import image_loop

    monkeypatch.setattr(image_loop, "HELD_OUT", 0.05)  # 89 held-out pairs: a short final evaluation

    out = tmp_path / "joint"
    assert main(["train", "--preset", "llava-tiny-joint", "--images", "digits", "--out", str(out), "--steps",
                 "40", "--batch-size", "16", "--lr", "3e-3", "--warmup", "4", "--eval-every", "40",
                 "--eval-batches", "1", "--log-every", "5", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "eval.json").read_text())
    assert summary["fusion"] == "joint" and summary["held_out"] == 89
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
