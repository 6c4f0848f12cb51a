"""Pictures: every preset draws a diagram; pattern PNGs hold exactly their masks; RoPE/ALiBi curves are the
components' own numbers; run plots read the documented formats."""
import json
import math
import re
import xml.etree.ElementTree as ET

import matplotlib.image as mpimg
import pytest
import torch

from llmarch import presets
from llmarch.analysis.diagram import architecture, to_mermaid
from llmarch.analysis.draw import render, save
from llmarch.analysis.layers import replaced_layers
from llmarch.analysis.pattern_plots import pattern_masks, picture_sparse, plot_patterns, read_mask_png
from llmarch.analysis.position_plots import alibi_bias, rope_decay_bound, rope_frequencies, rope_inner_product
from llmarch.analysis.run_plots import expert_load_figure, read_expert_load, read_metrics
from llmarch.cli import main
from llmarch.config import RopeConfig
from llmarch.nn.patterns import PATTERNS, build_pattern
from llmarch.nn.position import alibi_slopes


@pytest.mark.parametrize("name", [n for n in presets.names() if presets.get(n).kind != "vision"])  # text models
def test_every_preset_has_a_mermaid_diagram(name):
    cfg = presets.get(name)
    text = to_mermaid(architecture(cfg, name))
    assert text.startswith(f"---\ntitle: {name}\n---\nflowchart TB\n")
    defined = set(re.findall(r"^\s+(\w+)[\[(]", text, flags=re.M))
    used = set(re.findall(r"^\s+(\w+) -(?:->|\. residual \.->) (\w+)$", text, flags=re.M))
    assert used and {x for edge in used for x in edge} <= defined
    blocks = cfg.n_layers - len(replaced_layers(cfg))  # cross blocks (mllama) are drawn beside the block
    assert f"V={cfg.vocab_size} x D={cfg.d_model}" in text and f"block x {blocks}" in text
    if cfg.mixer == "latent":
        assert f"kv latent R={cfg.mla.kv_lora_rank}" in text
    else:
        assert f"H={cfg.n_heads} q heads, G={cfg.kv_heads} kv heads, Dh={cfg.dh}" in text
    if cfg.kind == "encoder_decoder":
        assert "encoder block x" in text and "decoder block x" in text and "cross-attention" in text
    if cfg.moe is not None:
        assert f"MoE: {cfg.moe.n_experts} experts" in text


def _labels(cfg):
    return {n.id: n.label for n in architecture(cfg).nodes}


def test_diagram_follows_the_config():
    llama = presets.get("llama-tiny")
    assert "GQA" in _labels(llama)["attn"] and "RoPE" in _labels(llama)["attn"]
    assert "MQA" in _labels(llama.replace(n_kv_heads=1))["attn"]
    pre = [n.id for n in architecture(llama).nodes]
    assert pre.index("norm1") < pre.index("attn") < pre.index("add1")
    post = [n.id for n in architecture(llama.replace(norm_placement="post")).nodes]
    assert post.index("attn") < post.index("add1") < post.index("norm1")
    assert "learned positions" in _labels(presets.get("gpt2-tiny"))["emb"]
    assert "ALiBi" in _labels(presets.get("bloom-tiny"))["attn"]
    assert "emb_norm" in _labels(presets.get("bloom-tiny"))

    d = architecture(presets.get("qwen2-moe-tiny"))
    ffn = next(n for n in d.nodes if n.id == "ffn")
    assert ffn.kind == "moe" and "8 experts" in ffn.label and "top-2" in ffn.label and "1 shared" in ffn.label
    mla = _labels(presets.get("deepseek-v2-tiny"))["attn"]
    assert "latent" in mla and "R=32" in mla and "Rq=48" in mla
    t5 = architecture(presets.get("t5-tiny"))
    assert set(t5.groups) == {"encoder", "decoder"} and ("enc_final_norm", "dec_cross") in t5.edges
    assert {n.group for n in t5.nodes if n.id.startswith("dec_") and n.kind == "attn"} == {"decoder"}

def test_bert_pretraining_heads_are_parallel_branches():
    d = architecture(presets.get("bert-tiny"))
    by_id = {n.id: n for n in d.nodes}
    entry = next(a for a, b in d.edges if b == "head_transform")
    assert (entry, "pooler") in d.edges  # both heads read the final hidden states
    assert ("pooler", "nsp") in d.edges and ("nsp", "nsp_logits") in d.edges
    assert not any(b in ("pooler", "nsp") and a in ("head", "logits", "head_transform") for a, b in d.edges)
    assert by_id["pooler"].beside == "head_transform" and by_id["nsp"].beside == "head"
    assert "first position" in by_id["pooler"].label and "[B, 2]" in by_id["nsp_logits"].label
    fig = render(d, "subtitle")
    fig.canvas.draw()
    xs = {t.get_text().split("\n")[0]: t.get_position()[0] for t in fig.axes[0].texts}
    assert xs["next-sentence head D -> 2"] > xs[by_id["head"].label]  # drawn beside the MLM decoder, not below


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "qwen2-57b-a14b", "mixtral-8x7b", "bert-base"])
def test_diagram_text_stays_inside_the_picture(name):
    from llmarch.cli.diagram import subtitle

    cfg = presets.get(name)
    fig = render(architecture(cfg, name), subtitle(cfg))
    fig.canvas.draw()
    box = fig.bbox
    for t in fig.axes[0].texts:
        ext = t.get_window_extent()
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 + 0.5, f"{t.get_text()!r} is clipped"


@pytest.mark.parametrize("name,suffix", [("llama-tiny", ".png"), ("bloom-tiny", ".svg"), ("gpt2-tiny", ".png")])
def test_rendered_diagram(tmp_path, name, suffix):
    cfg = presets.get(name)
    path = save(render(architecture(cfg, name), "subtitle"), tmp_path / f"d{suffix}")
    if suffix == ".png":
        img = mpimg.imread(path)
        assert img.shape[0] > img.shape[1] > 300  # a tall picture
    else:
        root = ET.parse(path).getroot()
        text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
        assert name in text and f"block x {cfg.n_layers}" in text


def _expected(name, n, w):
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    causal = k <= q
    return {"dense": causal, "sliding": causal & (q - k < w)}.get(name)


def test_each_pattern_png_holds_its_mask_pixel_for_pixel(tmp_path):
    n, w, scale = 24, 5, 3
    files = plot_patterns(tmp_path, n=n, window=w, scale=scale)
    masks, skipped = pattern_masks(n, w)
    assert not skipped and set(files) - {"overview"} == set(masks) == set(PATTERNS.names())  # every pattern drawn
    for name, mask in masks.items():
        img = mpimg.imread(files[name])
        assert img.shape[:2] == (n * scale, n * scale)
        assert torch.equal(read_mask_png(files[name], scale), mask)
        assert torch.equal(mask, build_pattern(name, window=w, sparse=picture_sparse(n)).render(n))
        if _expected(name, n, w) is not None:  # written out by hand for the foundation's patterns
            assert torch.equal(mask, _expected(name, n, w))
    assert files["overview"].is_file()


def test_rope_curves_are_the_rotation_the_model_applies():
    rope = RopeConfig(theta=10000.0)
    inv = rope_frequencies(64, rope, 2048)
    assert torch.allclose(inv, 10000.0 ** (-torch.arange(0, 64, 2).float() / 64))
    m = torch.tensor([0, 1, 7, 300])
    expect = torch.cos(m[:, None].float() * inv[None]).mean(-1)
    assert torch.allclose(rope_inner_product(64, rope, 2048, m), expect, atol=1e-5)
    bound = rope_decay_bound(inv, torch.tensor([0, 50000]))
    assert math.isclose(float(bound[0]), (32 + 1) / 2, rel_tol=1e-6)  # |S_j| = j at m = 0
    assert float(bound[1]) < 0.5 * float(bound[0])  # decays with distance
    scaled = rope_frequencies(64, RopeConfig(scaling="linear", factor=4.0), 2048)
    assert torch.allclose(scaled, inv / 4)


def test_alibi_bias_is_minus_slope_times_distance():
    b = alibi_bias(6, 10)
    slopes = alibi_slopes(6)
    i, j = 7, 2
    assert torch.allclose(b[:, i, j], -slopes * (i - j))
    assert torch.isnan(b[:, 2, 7]).all()


def test_plot_loss_reads_metrics_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    recs = [dict(step=s, loss=5 - 0.1 * s, lr=1e-3, tokens_per_s=1000.0) for s in range(20)]
    recs[9]["val_loss"] = 4.2
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert len(read_metrics(run)) == 20
    out = tmp_path / "loss.png"
    assert main(["plot", "loss", str(run), "-o", str(out)]) == 0 and mpimg.imread(out).size
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo')  # a write torn by a crash
    assert read_metrics(run) == [{"step": 1, "loss": 2}]  # as the trainer reads it: the torn line skipped
    (run / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="no step records"):
        read_metrics(run)


def test_plot_experts_reads_the_documented_formats(tmp_path):
    load = [[10, 30, 20, 40], [25, 25, 25, 25]]
    (tmp_path / "expert_load.json").write_text(json.dumps({"tokens_per_expert": load, "layers": [1, 3]}))
    stats = read_expert_load(tmp_path)
    assert stats["tokens_per_expert"].tolist() == load and stats["layers"] == [1, 3]
    out = tmp_path / "experts.png"
    assert main(["plot", "experts", "--checkpoint", str(tmp_path), "-o", str(out)]) == 0 and out.is_file()
    fig = expert_load_figure(stats)
    fig.canvas.draw()
    heat = fig.axes[0]
    bars = next(ax for ax in fig.axes if ax.get_legend() is not None)  # busiest/idlest bars
    assert list(heat.get_xticks()) == [0, 1, 2, 3]  # whole experts, no fractional ticks
    legend = bars.get_legend().get_window_extent()
    assert not legend.overlaps(bars.get_window_extent())  # the legend sits beside the bars, not over them
    other = tmp_path / "run"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0, "expert_load": load}) + "\n")
    assert read_expert_load(other)["tokens_per_expert"].shape == (2, 4)
    with pytest.raises(FileNotFoundError, match="expert_load"):
        read_expert_load(tmp_path / "nowhere")


def test_extrapolation_plot_includes_the_training_length(tmp_path):
    from llmarch.ablate.report import extrapolation_points, plot_extrapolation

    r = {"name": "rope", "status": "ok", "final_ppl": 20.0, "ppl_at": {"256": 25.0, "512": 40.0}}
    assert extrapolation_points(r, [256, 512], train_len=128) == [(128, 20.0), (256, 25.0), (512, 40.0)]
    r2 = dict(r, ppl_at={"128": 19.0, "256": 25.0})  # evaluated at the training length: that number is used
    assert extrapolation_points(r2, [128, 256], train_len=128) == [(128, 19.0), (256, 25.0)]
    assert plot_extrapolation([r], [256, 512], tmp_path / "x.png", train_len=128).is_file()
