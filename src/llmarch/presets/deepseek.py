"""DeepSeek-V2 (DeepSeek-AI 2024): multi-head latent attention + DeepSeekMoE. Sizes from the released
DeepSeek-V2-Lite config.json: d 2048, 27 layers, 16 heads, kv_lora_rank 512, no q latent, rope/nope/v head dims
64/128/128, yarn x40 from 4k with mscale_all_dim 0.707, vocabulary 102400; layer 0 dense SwiGLU (d_ff 10944), layers
1-26 MoE: 64 routed experts of width 1408 (softmax, top 6, not renormalised, routed_scaling_factor 1, greedy), 2
shared experts, aux_loss_alpha 0.001. 15,706,484,224 parameters (the model card's 15.7B; transformers counts the
same on the translated config); 2,661,150,208 active per token with embeddings and head, 2,451,435,008 without the
input embedding (the card's 2.4B).
"""
from llmarch.presets import register

DEEPSEEK_V2 = dict(kind="decoder", mixer="latent", norm="rmsnorm", norm_bias=False, norm_eps=1e-6, ffn="glu",
                   activation="silu", position="rope", tie_embeddings=False, bos_token_id=100000,
                   eos_token_id=100001)
LITE_MOE = dict(n_experts=64, top_k=6, d_ff=1408, router="softmax_topk", n_shared=2, first_dense=1,
                balance_coef=0.001)
register("deepseek-v2-lite", dict(
    DEEPSEEK_V2, ffn="moe", moe=LITE_MOE, vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, d_ff=10944,
    max_seq_len=163840,
    rope=dict(theta=10000.0, scaling="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
              attention_factor=1.0),  # mscale == mscale_all_dim (0.707): cos/sin scale 1
    mla=dict(kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
             mscale_all_dim=0.707)))
register("deepseek-v2-tiny", dict(
    DEEPSEEK_V2, ffn="moe", moe=dict(LITE_MOE, n_experts=8, top_k=2, d_ff=64), vocab_size=2048, d_model=128,
    n_layers=4, n_heads=4, d_ff=352, max_seq_len=512,
    bos_token_id=None, eos_token_id=None,
    mla=dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24)))
