"""The image side in the analysis: FLOPs of a vision-language forward (text stack with its cross-attention, cross
block or joint layers, plus tower, projector and fusion layers per image) equal torch's FlopCounterMode on the real
module for every fusion; hand-computed counts for llava-tiny-xattn, mllama-tiny and llava-tiny-joint; analyze() / inspect / compare report the image parts."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llmarch
from llmarch.analysis import analyze, forward_flops
from llmarch.analysis.flops import decode_flops_per_token
from llmarch.analysis.vision import image_flops, image_summary
from llmarch.nn.kernels import KERNELS

FUSION_PRESETS = ["llava-tiny", "llava-tiny-xattn", "llava-tiny-joint", "mllama-tiny"]


def image_inputs(v, B: int) -> dict:
    """One image per row: [B, C, H, W], or for a tiled tower [B, 1 image, tiles, C, H, W] with every tile real."""
    if v.positions != "gated_tiles":
        return {"pixel_values": torch.randn(B, 3, v.image_size, v.image_size)}
    tiles = v.max_num_tiles
    return {"pixel_values": torch.randn(B, 1, tiles, 3, v.image_size, v.image_size),
            "aspect_ratio_ids": torch.full((B, 1), tiles),  # id t: the (1, t) canvas when t <= 2
            "aspect_ratio_mask": torch.ones(B, 1, tiles, dtype=torch.long)}


@pytest.mark.parametrize("name", FUSION_PRESETS)
def test_text_and_image_flops_equal_the_flop_counter(name):
    torch.manual_seed(0)
    cfg = llmarch.preset(name)
    model = llmarch.build(cfg).eval()
    for m in model.modules():  # the reference kernel's matmuls are visible to the counter (SDPA's on CPU are not)
        if hasattr(m, "kernel"):
            m.kernel = KERNELS["naive"]
    v, B, T = cfg.vision, 2, 24
    ids = torch.randint(0, 200, (B, T))
    if v.fusion == "projector":  # the image tokens are text positions
        ids[:, 1:1 + v.image_tokens] = v.image_token_id
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, **image_inputs(v, B))
    expected = forward_flops(cfg, T, B).forward + sum(image_flops(cfg, images=B).values())
    assert counter.get_total_flops() == expected


def test_cross_attention_flops_by_hand():
    """llava-tiny-xattn: D=64, H=4 heads of Dh=16, G=2; one gated cross-attention layer; N=16 image features
    (a 4x4 patch grid, class token dropped)."""
    cfg = llmarch.preset("llava-tiny-xattn")
    text_only = cfg.replace(vision=None)
    T = 10
    per_token = 2 * (2 * 64 * 64 + 16 * 2 * 4 * 16)  # q and o projections; q.k and p.v over 16 image keys
    assert forward_flops(cfg, T).forward - forward_flops(text_only, T).forward == T * per_token == 204_800
    assert forward_flops(cfg, T).cross_attention == T * per_token
    assert image_flops(cfg)["image_layers"] == 2 * 16 * 64 * 2 * 2 * 16  # k and v of 16 features, once
    s = image_summary(cfg)
    assert s["image_tokens"] == 0 and s["image_features"] == 16  # the image stays out of the context
    gate = 1
    norm = 64  # RMSNorm gains: the cross-attention's pre-norm and the norm on the features
    cross = 64 * 64 + 2 * 64 * 32 + 64 * 64 + gate
    assert s["params"]["image_cross"] == cross + norm + norm


def test_cross_block_flops_by_hand():
    """mllama-tiny: D=64, H=4 heads of Dh=16, G=2, GLU F=128, 3 layers with a cross block in layer 1; N=34 image
    tokens per image (2 tiles x (16 patches + class token)). The cross block has no self-attention: per text
    token q and o and 34 image keys instead of q/k/v/o and the text keys; its FFN stays."""
    cfg = llmarch.preset("mllama-tiny")
    text_only = cfg.replace(vision=None)
    T, N = 10, 34
    self_attention = 2 * T * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64) + 2 * T * T * 2 * 4 * 16
    cross = 2 * T * (2 * 64 * 64) + 2 * T * N * 2 * 4 * 16
    assert forward_flops(cfg, T).forward - forward_flops(text_only, T).forward == cross - self_attention
    assert forward_flops(cfg, T).cross_attention == cross
    assert image_flops(cfg)["image_layers"] == 2 * N * 64 * 2 * 2 * 16  # k and v of the 34 tokens, once
    decode = decode_flops_per_token(cfg, 20) - decode_flops_per_token(text_only, 20)
    assert decode == 2 * (2 * 64 * 64 + N * 2 * 4 * 16) - 2 * (64 * 8 * 16 + 4 * 16 * 64 + 20 * 2 * 4 * 16)
    assert image_summary(cfg)["image_tokens"] == 1  # one image token in the text per image


def test_cross_blocks_keep_no_text_cache_and_the_analysis_agrees():
    from llmarch.analysis.memory import kv_bytes_per_token

    cfg = llmarch.preset("mllama-tiny")
    model = llmarch.build(cfg).eval()
    B, T = 2, 5
    ids = torch.randint(0, 200, (B, T))
    ids[:, 1] = cfg.vision.image_token_id
    with torch.no_grad():
        cache = model(ids, use_cache=True, **image_inputs(cfg.vision, B)).cache
    assert sorted(cache.k) == [0, 2]  # layer 1 is the cross block: no text keys
    per_token = sum(cache.k[i][0].numel() + cache.v[i][0].numel() for i in cache.k) / T
    assert kv_bytes_per_token(cfg, "fp32") == per_token * 4


def test_joint_flops_by_hand():
    """llava-tiny-joint: both layers joint; per image the 16 features run the two blocks (q/k/v/o projections,
    a GLU FFN with F=128, 16x16 scores); each text token reads 16 more keys per layer."""
    cfg = llmarch.preset("llava-tiny-joint")
    proj = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64
    ffn = 3 * 64 * 128
    pairs = 2 * 4 * 16
    assert image_flops(cfg)["image_layers"] == 2 * 2 * (16 * (proj + ffn) + 16 * 16 * pairs)
    T = 10
    extra = forward_flops(cfg, T).forward - forward_flops(cfg.replace(vision=None), T).forward
    assert extra == 2 * T * 2 * 16 * pairs
    assert image_summary(cfg)["image_tokens"] == 16


def test_analyze_and_the_cli_report_the_image_side(capsys):
    from llmarch.cli import main

    cfg = llmarch.preset("llava-tiny-xattn")
    images = analyze(cfg, seq_len=32).to_dict()["images"]
    assert images["params"]["image_cross"] > 0 and images["flops_per_image"]["image_layers"] > 0
    assert analyze(cfg.replace(vision=None), seq_len=32).to_dict()["images"] is None
    assert main(["inspect", "llava-tiny-joint", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"]["image_tokens"] == 16
    assert main(["compare", "llava-tiny", "llava-tiny-xattn", "llama-tiny"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("image side"))
    assert "projector" in row and "cross_attention" in row and "-" in row


@pytest.mark.parametrize("name,target", [("llava-tiny", "emb"), ("llava-tiny-xattn", "cross"),
                                         ("llava-tiny-joint", "attn")])
def test_diagram_draws_the_tower_and_projector_beside_the_decoder(name, target):
    from llmarch.analysis.diagram import architecture, to_mermaid
    from llmarch.analysis.draw import SIDE_W, render

    cfg = llmarch.preset(name)
    d = architecture(cfg, name)
    by_id = {n.id: n for n in d.nodes}
    assert by_id["vision_tower"].beside == "ids" and by_id["projector"].beside == "emb"
    assert ("vision_tower", "projector") in d.edges and ("projector", target) in d.edges
    assert "N=16 features per image" in by_id["vision_tower"].label
    assert ("cross" in by_id) == (cfg.vision.fusion == "cross_attention")
    assert ("keys [N=16 image; text]" in by_id["attn"].label) == (cfg.vision.fusion == "joint")
    assert "projector -->" in to_mermaid(d)
    fig = render(d, "subtitle")
    fig.canvas.draw()
    side = {by_id["vision_tower"].label, by_id["projector"].label}
    widths = [t.get_window_extent().width for t in fig.axes[0].texts if t.get_text() in side]
    assert len(widths) == 2 and max(widths) <= SIDE_W * fig.dpi  # the labels fit their boxes


@pytest.mark.parametrize("name", ["mllama-tiny", "llama-3.2-11b-vision"])
def test_diagram_draws_the_tiled_tower_and_the_cross_blocks(name):
    from llmarch.analysis.diagram import architecture, to_mermaid
    from llmarch.analysis.draw import SIDE_W, render

    cfg = llmarch.preset(name)
    v = cfg.vision
    d = architecture(cfg, name)
    by_id = {n.id: n for n in d.nodes}
    assert by_id["cross_block"].beside == "attn" and ("projector", "cross_block") in d.edges
    assert d.groups["block"] == f"block x {cfg.n_layers - len(v.cross_layers)} (pre-norm)"  # the rest are cross
    assert f"{','.join(map(str, v.cross_layers))} (of {cfg.n_layers})" in by_id["cross_block"].label
    tower = by_id["vision_tower"].label
    assert f"{v.n_layers} local + {v.global_layers} gated global blocks" in tower
    assert f"N={v.image_tokens} features ({v.max_num_tiles} tiles x {v.tile_tokens})" in tower
    assert by_id["projector"].label.startswith(f"projector: Linear {v.feature_dim}->{cfg.d_model}\n")  # one Linear
    assert "projector --> cross_block" in to_mermaid(d)
    fig = render(d, "subtitle")
    fig.canvas.draw()
    side = {by_id[k].label for k in ("vision_tower", "projector", "cross_block")}
    widths = [t.get_window_extent().width for t in fig.axes[0].texts if t.get_text() in side]
    assert len(widths) == 3 and max(widths) <= SIDE_W * fig.dpi  # the labels fit their boxes
