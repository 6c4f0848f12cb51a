"""Conditioned decoders (seed 002: a style id fused into the hidden states): llama-tiny with 4 style ids, added to
the inputs or modulating the final hidden states (adaptive norm); and an encoded instruction through a fusion layer."""
from llmarch.presets import register
from llmarch.presets.llama import LLAMA2

TINY = dict(LLAMA2, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=512,
            bos_token_id=None, eos_token_id=None)
register("llama-tiny-style", dict(TINY, condition=dict(n_styles=4, fusion="add")))
register("llama-tiny-adanorm", dict(TINY, condition=dict(n_styles=4, fusion="adanorm")))
# an instruction (token ids) through one bidirectional block of the same kind, mean-pooled, fused by a fusion layer
register("llama-tiny-instruct", dict(TINY, condition=dict(n_styles=0, fusion="fusion_layer", instruction_layers=1)))
