"""BLOOM (BigScience 2022): ALiBi, LayerNorm after the embeddings, GELU (tanh) MLP, biases everywhere, tied head."""
from llmarch.presets import register

BLOOM = dict(kind="decoder", vocab_size=250880, norm="layernorm", norm_eps=1e-5, embed_norm=True, ffn="mlp",
             activation="gelu_tanh", ffn_bias=True, qkv_bias=True, out_bias=True, position="alibi",
             tie_embeddings=True, max_seq_len=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3)

register("bloom-560m", dict(BLOOM, d_model=1024, n_layers=24, n_heads=16, d_ff=4096), 559_214_592)
register("bloom-176b", dict(BLOOM, d_model=14336, n_layers=70, n_heads=112, d_ff=57344), 176_247_271_424)
register("bloom-tiny", dict(BLOOM, vocab_size=2048, d_model=96, n_layers=2, n_heads=6, d_ff=384, max_seq_len=512,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None))
