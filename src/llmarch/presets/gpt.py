"""GPT-1 (Radford et al. 2018), GPT-2 (Radford et al. 2019; sizes and counts from the released checkpoints), GPT-3
(Brown et al. 2020, Table 2.1) and the seed's speculated GPT-4 (an MoE; most of its numbers are rumours)."""
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

# GPT-1 (Radford et al. 2018, sec. 4.1): 12 post-norm layers (LayerNorm after each residual add, no final norm),
# d 768, 12 heads, FFN 3072, GELU (erf), learned positions over 512 tokens, a 40,478-token BPE, tied head. The
# "117M" of the seeds' timeline is the rounded count of the released openai-gpt checkpoint: 116,534,784 tensors.
register("gpt-1", dict(kind="decoder", vocab_size=40478, max_seq_len=512, d_model=768, n_layers=12, n_heads=12,
                       d_ff=3072, norm="layernorm", norm_eps=1e-5, norm_placement="post", final_norm=False,
                       ffn="mlp", activation="gelu", ffn_bias=True, qkv_bias=True, out_bias=True, position="learned",
                       tie_embeddings=True), 116_534_784)

# The seed's "GPT-4" (speculation, not a published model): the seed gives 16 experts, top-2 routing, 120 layers,
# d_model 12288, 96 heads and a 32k context. ASSUMED here (the seed is silent): a GPT-3-style block (pre-norm
# LayerNorm, GELU MLP experts of width 4*d, learned positions, biases), MHA, every layer MoE, and the cl100k
# vocabulary of 100,277 tokens. The count this gives (2.39T; the rumoured 1.8T would need narrower experts) follows
# from those assumptions and is not registered as published.
register("gpt4-speculated", dict(GPT2, vocab_size=100277, max_seq_len=32768, d_model=12288, n_layers=120,
                                 n_heads=96, d_ff=4 * 12288, ffn="moe", ffn_bias=False, tie_embeddings=False,
                                 bos_token_id=None, eos_token_id=None,
                                 moe=dict(n_experts=16, top_k=2, router="topk_softmax", expert_ffn="mlp")))
