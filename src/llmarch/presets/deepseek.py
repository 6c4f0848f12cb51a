"""DeepSeek-V2 (DeepSeek-AI 2024): multi-head latent attention. Sizes from the released DeepSeek-V2-Lite
config.json: d 2048, 27 layers, 16 heads, kv_lora_rank 512, no q latent, rope/nope/v head dims 64/128/128,
yarn x40 from 4k with mscale_all_dim 0.707, vocabulary 102400.

The MoE FFN (64 routed + 2 shared experts, 6 active, first layer dense with d_ff 10944) is not in these presets
yet: every layer here is dense with d_ff 10944 until the mixture-of-experts FFN is merged, so parameter counts do
not match the model card (15.7B) yet.
"""
from llmarch.presets import register

DEEPSEEK_V2 = dict(kind="decoder", mixer="latent", norm="rmsnorm", norm_bias=False, norm_eps=1e-6, ffn="glu",
                   activation="silu", position="rope", tie_embeddings=False, bos_token_id=100000,
                   eos_token_id=100001)
register("deepseek-v2-lite", dict(
    DEEPSEEK_V2, vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, d_ff=10944, max_seq_len=163840,
    rope=dict(theta=10000.0, scaling="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
              attention_factor=1.0),  # mscale == mscale_all_dim (0.707): cos/sin scale 1
    mla=dict(kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
             mscale_all_dim=0.707)))
register("deepseek-v2-tiny", dict(
    DEEPSEEK_V2, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_ff=352, max_seq_len=512,
    bos_token_id=None, eos_token_id=None,
    mla=dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24)))
