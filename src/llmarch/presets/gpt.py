"""GPT-2 (Radford et al. 2019; sizes and counts from the released checkpoints) and GPT-3 (Brown et al. 2020,
Table 2.1)."""
from llmarch.presets import register

GPT2 = dict(kind="decoder", vocab_size=50257, max_seq_len=1024, norm="layernorm", norm_eps=1e-5,
            norm_placement="pre", ffn="mlp", activation="gelu_tanh", ffn_bias=True, qkv_bias=True, out_bias=True,
            position="learned", tie_embeddings=True, bos_token_id=50256, eos_token_id=50256)

for name, d, L, H, params in [("gpt2", 768, 12, 12, 124_439_808), ("gpt2-medium", 1024, 24, 16, 354_823_168),
                              ("gpt2-large", 1280, 36, 20, 774_030_080), ("gpt2-xl", 1600, 48, 25, 1_557_611_200)]:
    register(name, dict(GPT2, d_model=d, n_layers=L, n_heads=H, d_ff=4 * d), params)
register("gpt2-tiny", dict(GPT2, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=256,
                           bos_token_id=None, eos_token_id=None))

# GPT-3 Table 2.1: n_params, n_layers, d_model, n_heads, d_head; context 2048; the GPT-2 tokenizer.
# The paper's layers alternate dense and locally banded sparse attention (as in the Sparse Transformer); the band
# width is not published. We choose W = 256 (an eighth of the context), run by the block-sparse execution.
GPT3 = dict(GPT2, max_seq_len=2048, pattern=("dense", "sliding"), window=256,
            sparse=dict(block=64, execution="blocks"))
for name, L, d, H, dh in [("gpt3-125m", 12, 768, 12, 64), ("gpt3-350m", 24, 1024, 16, 64),
                          ("gpt3-760m", 24, 1536, 16, 96), ("gpt3-1.3b", 24, 2048, 24, 128),
                          ("gpt3-2.7b", 32, 2560, 32, 80), ("gpt3-6.7b", 32, 4096, 32, 128),
                          ("gpt3-13b", 40, 5140, 40, 128), ("gpt3-175b", 96, 12288, 96, 128)]:
    register(name, dict(GPT3, n_layers=L, d_model=d, n_heads=H, head_dim=dh, d_ff=4 * d))
register("gpt3-tiny", dict(GPT3, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=256,
                           window=16, sparse=dict(block=8, execution="blocks"), bos_token_id=None,
                           eos_token_id=None))
