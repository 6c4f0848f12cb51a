"""T5 (Raffel et al. 2020, sec. 3.7 / Table 14 sizes; released config.json files) and T5 v1.1 (gated-GELU FFN,
untied head, no rescale). Pre-norm RMSNorm without bias, relative position bias (32 buckets, max distance 128),
unscaled scores, ReLU FFN, one embedding shared by encoder, decoder and (v1.0) the head. Counts are those of the
released checkpoints' tensors, tied weights counted once."""
from llmarch.presets import register

T5 = dict(kind="encoder_decoder", vocab_size=32128, max_seq_len=512, norm="rmsnorm", norm_bias=False, norm_eps=1e-6,
          fp16_clamp=True, norm_placement="pre", final_norm=True, ffn="mlp", activation="relu", position="relative", attn_scale=1.0,
          rel_buckets=32, rel_max_distance=128, tie_embeddings=True, scale_head=True, dropout=0.1,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

for name, d, L, H, dh, F, params in [("t5-small", 512, 6, 8, 64, 2048, 60_506_624),
                                     ("t5-base", 768, 12, 12, 64, 3072, 222_903_552),
                                     ("t5-large", 1024, 24, 16, 64, 4096, 737_668_096),
                                     ("t5-3b", 1024, 24, 32, 128, 16384, 2_851_598_336),
                                     ("t5-11b", 1024, 24, 128, 128, 65536, 11_307_321_344)]:
    register(name, dict(T5, d_model=d, n_layers=L, n_heads=H, head_dim=dh, d_ff=F), params)
register("t5-tiny", dict(T5, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128,
                         rel_buckets=8, rel_max_distance=20))

T5_V11 = dict(T5, ffn="glu", activation="gelu_tanh", tie_embeddings=False, scale_head=False)
register("t5-v1.1-base", dict(T5_V11, d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=2048), 247_577_856)
register("t5-v1.1-tiny", dict(T5_V11, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=96,
                              rel_buckets=8, rel_max_distance=20))
