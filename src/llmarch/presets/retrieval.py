"""Retrieval-augmented models.

RETRO (Borgeaud et al. 2022, Table 2 and sec. 2): chunks of m=64 tokens, k=2 neighbours of r=128 tokens (chunk +
continuation), a 2-layer bidirectional neighbour encoder, chunked cross-attention in every 3rd decoder layer from
layer 6 (1-based), 2048-token context, a 128k SentencePiece vocabulary. The paper's positions are Transformer-XL
style relative encodings, which this library does not have; RoPE stands in, and the neighbour encoder shares the
decoder's width (the paper's is narrower), so no published parameter count is registered.

DPR (Karpukhin et al. 2020): two BERT-base encoders (question, context) whose output is the [CLS] state.
Fusion-in-Decoder (Izacard & Grave 2021): a T5 run over each (question + passage) separately; the sizes are T5's.
"""
from llmarch.presets import register
from llmarch.presets.bert import BERT
from llmarch.presets.t5 import T5

RETRO = dict(kind="decoder", vocab_size=128000, max_seq_len=2048, norm="rmsnorm", norm_bias=False, norm_eps=1e-6,
             ffn="mlp", activation="gelu", position="rope", tie_embeddings=False)
register("retro-7.5b", dict(RETRO, d_model=4096, n_layers=32, n_heads=32, head_dim=128, d_ff=16384,
                            retrieval=dict(chunk_size=64, n_neighbours=2, neighbour_len=128,
                                           cca_layers=list(range(5, 32, 3)), encoder_layers=2)))
register("retro-tiny", dict(RETRO, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=512,
                            retrieval=dict(chunk_size=32, n_neighbours=2, neighbour_len=64, cca_layers=[1, 3],
                                           encoder_layers=1)))

DPR = dict(BERT, head="first_token", tie_embeddings=False)
register("dpr-base", dict(DPR, d_model=768, n_layers=12, n_heads=12, d_ff=3072))
register("dpr-tiny", dict(DPR, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128))

register("fid-base", dict(T5, d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=3072))
register("fid-tiny", dict(T5, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128,
                          rel_buckets=8, rel_max_distance=20))
