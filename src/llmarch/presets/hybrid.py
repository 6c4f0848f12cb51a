"""Hybrid linear-time + attention models.

Qwen3-Next (Qwen team 2025): numbers from the released Qwen/Qwen3-Next-80B-A3B-Instruct config.json — 48 layers
of width 2048 in the schedule (gated delta, gated delta, gated delta, gated attention) x 12
(full_attention_interval 4); gated delta layers with 16 q/k heads and 32 v heads of 128, conv kernel 4; gated
attention with 16 heads and 2 kv heads of 256, rotary on a quarter of each head (partial_rotary_factor 0.25, theta
1e7); every FFN an MoE of 512 SwiGLU experts of width 512, top 10 renormalised, plus one sigmoid-gated shared
expert of 512; zero-centred RMSNorm eps 1e-6; vocabulary 151936, untied; context 262144. The model card gives
"80B total, 3B activated" (rounded); the exact count is checked against transformers' Qwen3NextForCausalLM built
on the meta device from the translated config (tests/test_hf_qwen3_next.py).
"""
from llmarch.presets import register

HYBRID_3_1 = ["gated_delta", "gated_delta", "gated_delta", "gated_attention"]
QWEN3_NEXT = dict(kind="decoder", norm="rmsnorm_zero", norm_eps=1e-6, norm_bias=False, ffn="moe", activation="silu",
                  position="rope", mixer="gated_attention", layer_mixers=HYBRID_3_1, tie_embeddings=False)

register("qwen3-next-80b-a3b", dict(
    QWEN3_NEXT, vocab_size=151936, d_model=2048, n_layers=48, n_heads=16, n_kv_heads=2, head_dim=256, d_ff=5120,
    max_seq_len=262144, rope=dict(theta=10000000.0, fraction=0.25), bos_token_id=151643, eos_token_id=151645,
    linear=dict(n_k_heads=16, n_v_heads=32, k_head_dim=128, v_head_dim=128, conv_kernel=4),
    moe=dict(n_experts=512, top_k=10, d_ff=512, router="softmax_topk_norm", n_shared=1, shared_d_ff=512,
             shared_gate=True, balance_coef=0.001)))
register("qwen3-next-tiny", dict(
    QWEN3_NEXT, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256,
    max_seq_len=512, rope=dict(theta=10000000.0, fraction=0.25),
    linear=dict(n_k_heads=2, n_v_heads=4, k_head_dim=32, v_head_dim=32, conv_kernel=4),
    moe=dict(n_experts=8, top_k=2, d_ff=64, router="softmax_topk_norm", n_shared=1, shared_d_ff=128,
             shared_gate=True, balance_coef=0.001)))
