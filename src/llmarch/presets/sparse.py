"""Sparse-attention families: the Sparse Transformer (Child et al. 2019), Longformer (Beltagy et al. 2020) and
BigBird (Zaheer et al. 2020). Sizes from the papers and the released config.json files.

Longformer and BigBird are encoders (RoBERTa-style: post-LayerNorm, learned positions, GELU MLP) that load from and
save to their transformers checkpoints (llmarch.hf: longformer, big_bird).
"""
from llmarch.presets import register

# Sparse Transformer, enwik8 (section 7.3): 30 layers, d 512, 8 heads, fixed pattern with stride 128 and c = 32,
# context 12,288 bytes; pre-norm blocks with GELU.
SPARSE_TRANSFORMER = dict(kind="decoder", vocab_size=256, norm="layernorm", norm_placement="pre", ffn="mlp",
                          activation="gelu", ffn_bias=True, qkv_bias=True, out_bias=True, position="learned")
register("sparse-transformer-enwik8", dict(
    SPARSE_TRANSFORMER, d_model=512, n_layers=30, n_heads=8, d_ff=2048, max_seq_len=12288, pattern=("fixed",),
    sparse=dict(stride=128, summary=32, execution="blocks")))
register("sparse-transformer-tiny", dict(
    SPARSE_TRANSFORMER, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=512, pattern=("strided",),
    sparse=dict(stride=16, block=16, execution="blocks")))

# RoBERTa-style encoder fields shared by Longformer and BigBird.
ROBERTA_LIKE = dict(kind="encoder", norm="layernorm", norm_bias=True, norm_placement="post", embed_norm=True,
                    final_norm=False, ffn="mlp", ffn_bias=True, qkv_bias=True, out_bias=True, position="learned",
                    tie_embeddings=True, d_model=768, n_layers=12, n_heads=12, d_ff=3072)

# longformer-base-4096 (config.json): attention_window 512 on every layer = 256 keys each side, so W = 257
# (|i - j| <= 256); RoBERTa positions from pad_token_id + 1 = 2 (4098 position rows), one token type; separate
# q/k/v projections for the global rows (mixer "longformer"). Global tokens are chosen per task through
# global_attention_mask (e.g. <s> for classification).
LONGFORMER = dict(ROBERTA_LIKE, vocab_size=50265, activation="gelu", norm_eps=1e-5, max_seq_len=4098,
                  pattern=("longformer",), window=257, mixer="longformer", head="mlm", type_vocab_size=1,
                  position_offset=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  sparse=dict(block=64, execution="blocks"))
register("longformer-base", LONGFORMER)
register("longformer-tiny", dict(LONGFORMER, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                                 max_seq_len=514, window=9, sparse=dict(block=8, execution="blocks")))

# bigbird-roberta-base (config.json, BigBirdForPreTraining): block 64, 3 random blocks, first and last block
# global (ITC), gelu_new, BERT positions from 0, two token types; transformers attends densely up to 5 + 2r = 11
# blocks (704 tokens).
BIGBIRD = dict(ROBERTA_LIKE, vocab_size=50358, activation="gelu_tanh", norm_eps=1e-12, max_seq_len=4096,
               pattern=("bigbird",), head="pretraining", type_vocab_size=2, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, sparse=dict(block=64, random_blocks=3, global_blocks=(0, -1), dense_up_to_blocks=11,
                                           execution="blocks"))
register("bigbird-roberta-base", BIGBIRD)
register("bigbird-tiny", dict(BIGBIRD, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                              max_seq_len=512, sparse=dict(block=8, random_blocks=2, dense_up_to_blocks=9,
                                                           execution="blocks")))
