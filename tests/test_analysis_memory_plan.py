"""KV cache, training memory and the planner against the model's own cache, the papers' formulas and published
figures; the inspect / compare / plan verbs."""
import json

import pytest
import torch

import llmarch
from llmarch import presets
from llmarch.analysis import analyze, kv_cache_bytes, plan_tokens, published_checks, training_memory
from llmarch.analysis.memory import (cross_kv_bytes_per_source_token, cross_kv_cache_bytes, kv_bytes_per_token,
                                      layer_activation_bytes_per_token, score_bytes_per_token)
from llmarch.analysis.planner import gpu_hours, plan_flops
from llmarch.cli import main


def _prefill_cache_bytes(cfg, T):
    model = llmarch.build(cfg).eval()
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (2, T)), use_cache=True)
    return out.cache.nbytes()


def test_kv_cache_matches_the_models_cache():
    dense = presets.get("llama-tiny")  # GQA: 2 kv heads of 32 dims, 4 layers
    assert kv_bytes_per_token(dense, "fp32") == 2 * 2 * 32 * 4 * 4
    assert _prefill_cache_bytes(dense, 50) == kv_cache_bytes(dense, 50, batch=2, dtype="fp32")
    slide = presets.get("mistral-tiny")  # window 64
    per_key_all_layers = 2 * slide.kv_heads * slide.dh * 4 * slide.n_layers
    assert kv_cache_bytes(slide, 40, 1, "fp32") == 40 * per_key_all_layers
    assert kv_cache_bytes(slide, 500, 1, "fp32") == kv_cache_bytes(slide, 64, 1, "fp32") == 64 * per_key_all_layers
    # between steps the cache keeps W-1 keys; the next token's attention reads those W-1 plus its own (W)
    assert _prefill_cache_bytes(slide, 100) == 2 * 63 * per_key_all_layers


def test_latent_and_cross_attention_caches_match_the_models_cache():
    mla = presets.get("deepseek-v2-tiny")  # R=32 latent + Dr=16 rope key per token per layer, 4 layers
    assert kv_bytes_per_token(mla, "fp32") == (32 + 16) * 4 * mla.n_layers
    assert _prefill_cache_bytes(mla, 30) == kv_cache_bytes(mla, 30, batch=2, dtype="fp32")
    t5 = presets.get("t5-tiny", n_decoder_layers=3)
    model = llmarch.build(t5).eval()
    S, T = 21, 9
    with torch.no_grad():
        out = model(torch.randint(0, t5.vocab_size, (2, S)), decoder_input_ids=torch.randint(0, t5.vocab_size, (2, T)),
                    use_cache=True)
    per_layer = 2 * t5.kv_heads * t5.dh * 4
    assert cross_kv_bytes_per_source_token(t5, "fp32") == 3 * per_layer  # decoder depth, not encoder depth
    assert out.cache.nbytes() == kv_cache_bytes(t5, T, 2, "fp32") + cross_kv_cache_bytes(t5, S, 2, "fp32")
    assert kv_bytes_per_token(presets.get("bert-tiny")) == 0  # an encoder keeps no cache
    lite = presets.get("deepseek-v2-lite")  # 512 + 64 numbers per token per layer vs 2·16·192 for MHA
    assert kv_bytes_per_token(lite, "bf16") == (512 + 64) * 2 * 27


def test_kv_cache_of_published_models():
    assert kv_bytes_per_token(presets.get("llama-2-7b"), "bf16") == 512 * 1024  # 2·32 heads·128·2 B·32 layers
    assert kv_bytes_per_token(presets.get("llama-2-70b"), "bf16") == 320 * 1024  # GQA: 8 kv heads, 80 layers
    mistral = presets.get("mistral-7b")
    assert kv_cache_bytes(mistral, 32768) == kv_cache_bytes(mistral, 4096) == 4096 * 128 * 1024


def test_activations_of_a_gpt_block_are_korthikanti_34sbh_plus_fp32_statistics():
    cfg = presets.get("gpt2", dropout=0.1, attn_dropout=0.1)
    D, H = cfg.d_model, cfg.n_heads
    # Korthikanti et al. 2022, eq. (1): 34·D per token with 2-byte activations; what our block saves (measured in
    # tests/test_analysis_activations.py) adds two LayerNorms' fp32 mean and 1/std and SDPA's fp32 log-sum-exp
    assert layer_activation_bytes_per_token(cfg, 0, 2.0) == 34 * D + 2 * 8 + 4 * H
    s = 1024
    assert score_bytes_per_token(cfg, s, 2.0) == 5 * H * s  # the 5·a·s²·b term per token


def test_training_state_is_16_bytes_per_param_in_bf16_and_checkpointing_saves_activations():
    cfg = presets.get("llama-2-7b")
    m = training_memory(cfg, 2048, 1, "bf16")
    N = 6_738_415_616
    assert m["weights"] + m["grads"] + m["adamw"] + m["master_weights"] == 16 * N
    assert m["activations_checkpointed"] < m["activations"] / 5
    assert training_memory(cfg, 2048, 1, "fp32")["master_weights"] == 0


def test_planner_against_published_figures():
    rows = {r["preset"]: r for r in published_checks()}
    gpt3 = rows["gpt3-175b"]
    assert gpt3["six_nd"] == 6 * 174_604_259_328 * 300e9
    assert abs(gpt3["six_nd"] / 3.14e23 - 1) < 0.005  # Brown et al. 2020: 3.14e23
    llama = rows["llama-2-70b"]
    assert llama["six_nd"] == 6 * 68_976_648_192 * 2e12 and llama["published"] == 1.7e23
    assert llama["ratio_6nd_to_published"] > 4  # the seed's figure is not 6·N·D; shown, not matched
    assert 0.3 < llama["implied_mfu"] < 0.6


def test_plan_arithmetic():
    cfg = presets.get("llama-2-7b")
    p = plan_tokens(cfg, 1e12, seq_len=4096)
    assert p.six_nd == 6 * 6_738_415_616 * 1e12
    attn_per_token = 3 * 4 * 4096 * 4096 * 32  # 3 × 4·s·d per layer × L
    assert p.attention_dense == pytest.approx(attn_per_token * 1e12)
    assert p.attention == pytest.approx(attn_per_token * 1e12 * 4097 / (2 * 4096))  # causal: T(T+1)/2 of T² pairs
    back = plan_flops(cfg, p.flops, seq_len=4096)
    assert back.tokens == pytest.approx(1e12)
    assert gpu_hours(3600 * 1e15, 1e15, mfu=0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mfu"):
        gpu_hours(1e20, "h100", mfu=1.5)


def test_analyze_validates_and_reports():
    r = analyze(presets.get("mistral-tiny"), seq_len=128, batch=2)
    assert r.meta_params == r.params.total
    assert r.flops.attention_useful < r.flops.attention  # causal + window 64
    with pytest.raises(ValueError, match="seq_len"):
        analyze(presets.get("gpt2-tiny"), seq_len=0)
    with pytest.raises(ValueError, match="dtype"):
        analyze(presets.get("gpt2-tiny"), dtype="fp13")


def test_inspect_table_and_json(capsys):
    assert main(["inspect", "llama-2-7b"]) == 0
    text = capsys.readouterr().out
    assert "6,738,415,616" in text and "512.00 KiB per token" in text and "untied LM head" in text
    assert main(["inspect", "--preset", "gpt2-tiny", "--json", "--seq-len", "64"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["total"] == d["params"]["meta_device_count"] == 182_016
    assert d["flops"]["step"]["forward"] == sum(d["flops"]["step"][k] for k in ("linear", "attention", "head"))
    assert main(["inspect", "no-such-model"]) == 2


def test_inspect_and_compare_encoder_decoder_moe_and_encoder(capsys):
    assert main(["inspect", "t5-tiny", "--json", "--seq-len", "32", "--dtype", "fp32"]) == 0
    d = json.loads(capsys.readouterr().out)
    t5 = presets.get("t5-tiny")
    assert d["params"]["total"] == d["params"]["meta_device_count"] and "unaccounted" not in d["params"]["components"]
    assert d["params"]["components"]["cross_kv"] == t5.n_layers * t5.d_model * 2 * t5.kv_heads * t5.dh
    assert set(d["params"]["stacks"]) == {"encoder", "decoder"}
    assert d["kv_cache"]["cross_bytes_for_source"] == 32 * 2 * t5.kv_heads * t5.dh * 4 * t5.n_layers
    assert d["flops"]["step"]["cross_attention"] > 0
    assert main(["inspect", "mixtral-tiny", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["total"] == d["params"]["meta_device_count"] > d["params"]["active"]
    assert d["params"]["components"]["router"] > 0 and d["params"]["components"]["ffn"] == 0
    assert main(["inspect", "bert-tiny"]) == 0  # an encoder: no decode FLOPs, no KV cache
    text = capsys.readouterr().out
    assert "an encoder does not generate" in text and "KV cache: none" in text and "pooler" in text
    assert main(["compare", "t5-tiny", "mixtral-tiny", "deepseek-v2-tiny", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["t5-tiny"]["layers"] == "2+2" and "cross" in d["t5-tiny"]["attention"]
    assert d["mixtral-tiny"]["ffn"].startswith("moe 4xglu top-2") and d["mixtral-tiny"]["active"] < \
        d["mixtral-tiny"]["params"]
    assert d["deepseek-v2-tiny"]["attention"].startswith("MLA")
    assert d["deepseek-v2-tiny"]["kv_bytes_per_token"] == (32 + 16) * 2 * 4


def test_compare_and_plan_verbs(capsys, tmp_path):
    cfg_file = tmp_path / "mine.json"
    presets.get("llama-tiny", n_kv_heads=1).to_file(cfg_file)
    assert main(["compare", "llama-tiny", str(cfg_file), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["llama-tiny"]["attention"].startswith("GQA") and d[str(cfg_file)]["attention"].startswith("MQA")
    assert d[str(cfg_file)]["kv_bytes_per_token"] == d["llama-tiny"]["kv_bytes_per_token"] / 2
    assert main(["plan", "--check"]) == 0
    assert "3.14e+23" in capsys.readouterr().out
    assert main(["plan", "gpt2", "--json", "--accelerator", "a100"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["tokens"] == 20 * p["params"] and p["gpu_hours"] == pytest.approx(p["flops"] / (312e12 * 0.4) / 3600)


def test_effective_reach_of_sliding_windows():
    from llmarch.analysis.reach import effective_reach

    mistral = effective_reach(llmarch.preset("mistral-7b"))
    assert mistral.paper_form == 32 * 4096  # the Mistral paper's 131k
    assert mistral.tokens == 32768 and mistral.limited_by_context  # capped by the 32k context
    long = effective_reach(llmarch.preset("mistral-7b").replace(max_seq_len=1_000_000))
    assert long.tokens == 32 * 4095  # each layer moves information W - 1 positions back
    tiny = llmarch.preset("mistral-tiny").replace(n_layers=3, window=4, max_seq_len=64)
    assert effective_reach(tiny).tokens == 9
    # naive: propagate "can influence the last position" back through 3 layers of the pattern's own mask
    from llmarch.nn.patterns import build_pattern

    allowed = build_pattern("sliding", window=4).allows(torch.arange(64)[:, None], torch.arange(64)[None, :], 64)
    allowed = allowed & (torch.arange(64)[:, None] >= torch.arange(64)[None, :])  # causal
    influence = torch.zeros(64, dtype=torch.bool)
    influence[-1] = True
    for _ in range(3):
        influence = influence | (allowed & influence[:, None]).any(0)
    assert int(influence.sum()) - 1 == effective_reach(tiny).tokens
    dense = effective_reach(llmarch.preset("llama-2-7b"))
    assert dense.tokens == 4096 and dense.paper_form is None


def test_seed_compute_figures_imply_token_counts():
    rows = {r["preset"]: r for r in published_checks()}
    for name, flops in (("mistral-7b", 2.5e22), ("gpt4-speculated", 2e25)):
        r = rows[name]
        assert r["tokens_implied"] and r["published"] == flops
        assert r["with_attention"] == pytest.approx(flops, rel=1e-9)  # the implied D spends exactly the budget
        assert r["six_nd"] == pytest.approx(6 * r["params"] * r["tokens"])
    gpt4 = presets.get("gpt4-speculated")
    assert rows["gpt4-speculated"]["params"] < analyze(gpt4, seq_len=16, verify=False).params.total / 4  # top-2/16


def test_decode_roofline_by_hand():
    from llmarch.analysis.planner import BANDWIDTH, decode_roofline

    cfg = presets.get("llama-2-7b")
    r = decode_roofline(cfg, "h100", context=4096, batch=1, dtype="bf16")
    kv = 2 * 32 * 4096 * 4096 * 2  # k and v, 32 layers, 4096 wide, 4096 tokens, 2 bytes
    read = 6_738_415_616 * 2 + kv
    assert r["bytes_per_step"] == read and r["bound"] == "memory"
    assert r["tokens_per_s"] == pytest.approx(BANDWIDTH["h100"] / read)
    big = decode_roofline(cfg, "h100", context=16, batch=4096)
    assert big["bound"] == "compute"


def test_paper_recipes_fill_the_optimiser_settings():
    from llmarch.cli import build_parser
    from llmarch.cli.train import train_config_from_args

    args = build_parser().parse_args(["train", "--preset", "llama-2-70b", "--out", "x", "--recipe", "paper",
                                      "--warmup", "10"])
    tc = train_config_from_args(args)
    assert (tc.lr, tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.clip, tc.min_lr_ratio) == \
        (1.5e-4, 0.9, 0.95, 1e-5, 0.1, 1.0, 0.1)
    assert tc.warmup == 10  # an explicit flag wins
    gpt3 = train_config_from_args(build_parser().parse_args(["train", "--preset", "gpt3-175b", "--out", "x",
                                                             "--recipe", "paper"]))
    assert (gpt3.lr, gpt3.eps, gpt3.warmup) == (0.6e-4, 1e-8, round(375e6 / 3.2e6))
    with pytest.raises(ValueError, match="no published recipe"):
        train_config_from_args(build_parser().parse_args(["train", "--preset", "llama-tiny", "--out", "x",
                                                          "--recipe", "paper"]))
