"""The Transformer of Vaswani et al. 2017 (Table 3: base N=6 d_model=512 d_ff=2048 h=8 P_drop=0.1; big d_model=1024
d_ff=4096 h=16 P_drop=0.3): post-norm encoder-decoder, sinusoidal positions (sec. 3.5), embeddings multiplied by
sqrt(d_model) and shared with the pre-softmax projection (sec. 3.4), ReLU FFN with biases, no biases in the
attention projections. The vocabulary is the WMT'14 En-De shared BPE of about 37000 tokens; token ids follow
tensor2tensor (pad 0, eos 1, decoding starts from pad). The paper gives rounded sizes (65M / 213M), so no exact
count is registered."""
from llmarch.presets import register

TRANSFORMER = dict(kind="encoder_decoder", vocab_size=37000, max_seq_len=1024, norm="layernorm", norm_eps=1e-6,
                   norm_placement="post", final_norm=False, ffn="mlp", activation="relu", ffn_bias=True,
                   qkv_bias=False, out_bias=False, position="sinusoidal", scale_embeddings=True, tie_embeddings=True,
                   dropout=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

register("transformer-base", dict(TRANSFORMER, d_model=512, n_layers=6, n_heads=8, d_ff=2048))
register("transformer-big", dict(TRANSFORMER, d_model=1024, n_layers=6, n_heads=16, d_ff=4096, dropout=0.3))
register("transformer-tiny", dict(TRANSFORMER, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                                  max_seq_len=256))
