"""LLaMA 1 (Touvron et al. 2023a, Table 2), Llama 2 (2023b), Llama 3 (Meta 2024), Mistral 7B (Jiang et al. 2023)
and Qwen2 (Yang et al. 2024): sizes from the papers and the released config.json files; counts from the cards."""
from llmarch.presets import register

LLAMA = dict(kind="decoder", vocab_size=32000, norm="rmsnorm", norm_bias=False, norm_eps=1e-6, ffn="glu",
             activation="silu", position="rope", rope=dict(theta=10000.0), max_seq_len=2048, tie_embeddings=False,
             bos_token_id=1, eos_token_id=2)

for name, d, L, H, F, params in [("llama-7b", 4096, 32, 32, 11008, 6_738_415_616),
                                 ("llama-13b", 5120, 40, 40, 13824, 13_015_864_320),
                                 ("llama-33b", 6656, 60, 52, 17920, 32_528_943_616),
                                 ("llama-65b", 8192, 80, 64, 22016, 65_285_660_672)]:
    register(name, dict(LLAMA, d_model=d, n_layers=L, n_heads=H, d_ff=F), params)

LLAMA2 = dict(LLAMA, max_seq_len=4096, norm_eps=1e-5)
register("llama-2-7b", dict(LLAMA2, d_model=4096, n_layers=32, n_heads=32, d_ff=11008), 6_738_415_616)
register("llama-2-13b", dict(LLAMA2, d_model=5120, n_layers=40, n_heads=40, d_ff=13824), 13_015_864_320)
register("llama-2-70b", dict(LLAMA2, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),
         68_976_648_192)
# Llama 2 34B (Touvron et al. 2023b, Table 1: GQA, 4k context) was never released; its architecture is that of
# Code Llama 34B (Roziere et al. 2023), which was initialised from it: d 8192, 48 layers, 64 heads, 8 kv heads,
# FFN 22016. Its count, 33,743,970,304, is that of the released Code Llama 34B tensors (same shapes, vocab 32000).
register("llama-2-34b", dict(LLAMA2, d_model=8192, n_layers=48, n_heads=64, n_kv_heads=8, d_ff=22016),
         33_743_970_304)

LLAMA3 = dict(LLAMA2, vocab_size=128256, max_seq_len=8192, rope=dict(theta=500000.0), bos_token_id=128000,
              eos_token_id=128001)
register("llama-3-8b", dict(LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
         8_030_261_248)
register("llama-3-70b", dict(LLAMA3, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),
         70_553_706_496)
register("llama-3.1-8b", dict(LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                              max_seq_len=131072,
                              rope=dict(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_seq_len=8192)), 8_030_261_248)
# Llama 3.1 405B (Meta 2024, Table 3; released config.json): d 16384, 126 layers, 128 heads, 8 kv heads, FFN 53248,
# trained on 15.6T tokens at 8k, then extended to 128k with the llama3 rope scaling.
register("llama-3.1-405b", dict(LLAMA3, d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, d_ff=53248,
                                max_seq_len=131072,
                                rope=dict(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_seq_len=8192)), 405_853_388_800)
register("llama-tiny", dict(LLAMA2, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352,
                            max_seq_len=512, bos_token_id=None, eos_token_id=None))

# Mistral 7B v0.1: sliding window 4096 on every layer.
register("mistral-7b", dict(LLAMA2, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                            max_seq_len=32768, pattern=("sliding",), window=4096), 7_241_732_096)
register("mistral-tiny", dict(LLAMA2, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352,
                              max_seq_len=512, pattern=("sliding",), window=64, bos_token_id=None,
                              eos_token_id=None))

# Qwen2: q/k/v biases, RoPE theta 1e6, RMSNorm eps 1e-6; small sizes tie the embeddings.
QWEN2 = dict(LLAMA, vocab_size=151936, qkv_bias=True, rope=dict(theta=1000000.0), max_seq_len=32768,
             bos_token_id=None, eos_token_id=151643)
register("qwen2-0.5b", dict(QWEN2, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864,
                            tie_embeddings=True), 494_032_768)
register("qwen2-1.5b", dict(QWEN2, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, d_ff=8960,
                            tie_embeddings=True), 1_543_714_304)
register("qwen2-7b", dict(QWEN2, vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                          d_ff=18944, max_seq_len=131072), 7_615_616_512)
register("qwen2-72b", dict(QWEN2, vocab_size=152064, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                           d_ff=29568, max_seq_len=131072), 72_706_203_648)
register("qwen2-tiny", dict(QWEN2, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352,
                            max_seq_len=512, tie_embeddings=True, eos_token_id=None))
