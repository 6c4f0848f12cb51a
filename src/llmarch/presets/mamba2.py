"""Mamba-2 (Dao & Gu 2024): blocks of RMSNorm + the SSD mixer, no FFN, tied embeddings. Sizes from the released
state-spaces/mamba2-* config.json files (d_state 128, head_dim 64, expand 2, one B/C group, conv kernel 4, chunk
256, vocabulary 50277 padded to a multiple of 16 = 50288). Parameter counts are those of transformers'
Mamba2ForCausalLM built from the same config on the meta device (the model cards give only the rounded names)."""
from llmarch.presets import register

MAMBA2 = dict(kind="decoder", norm="rmsnorm", norm_bias=False, norm_placement="pre", ffn="none", position="none",
              embed_norm=False, final_norm=True, mixer="mamba2", tie_embeddings=True, norm_eps=1e-5,
              vocab_size=50288, max_seq_len=2048, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def mamba2(d_model: int, n_layers: int, *, head_dim: int = 64, expand: int = 2, **ssm) -> dict:
    """Fields of a Mamba-2 LM: n_heads/head_dim record the SSM heads, d_ff its inner width (there is no FFN)."""
    return dict(MAMBA2, d_model=d_model, n_layers=n_layers, n_heads=expand * d_model // head_dim, head_dim=head_dim,
                d_ff=expand * d_model, ssm=dict(dict(d_state=128, n_groups=1, conv_kernel=4, chunk_size=256),
                                                head_dim=head_dim, expand=expand, **ssm))


register("mamba2-130m", mamba2(768, 24), params=128_989_632)
register("mamba2-2.7b", mamba2(2560, 64), params=2_702_599_680)
register("mamba2-tiny", dict(mamba2(64, 2, head_dim=16, d_state=16, n_groups=2, chunk_size=16), vocab_size=512,
                             ))
