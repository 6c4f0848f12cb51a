"""Mixture-of-experts decoders: Mixtral (Jiang et al. 2024) and Qwen1.5-MoE / Qwen2-MoE (Qwen team 2024; Yang et
al. 2024). Sizes from the released config.json files; counts from the model cards where they give one."""
from llmarch.presets import register
from llmarch.presets.llama import LLAMA2, QWEN2

# Mixtral: Mistral-style attention (no window in the released configs), 8 SwiGLU experts per layer, top-2.
MIXTRAL = dict(LLAMA2, ffn="moe", max_seq_len=32768, rope=dict(theta=1000000.0),
               moe=dict(n_experts=8, top_k=2, router="topk_softmax", balance_coef=0.02))
register("mixtral-8x7b", dict(MIXTRAL, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
         46_702_792_704)
register("mixtral-tiny", dict(MIXTRAL, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=256,
                              max_seq_len=512, moe=dict(MIXTRAL["moe"], n_experts=4), bos_token_id=None,
                              eos_token_id=None))

# Qwen-MoE: fine-grained experts (softmax, top-k, not renormalised) + one shared expert behind a sigmoid gate.
QWEN_MOE = dict(QWEN2, ffn="moe", tie_embeddings=False)
register("qwen1.5-moe-a2.7b", dict(QWEN_MOE, d_model=2048, n_layers=24, n_heads=16, d_ff=5632, max_seq_len=8192,
                                   moe=dict(n_experts=60, top_k=4, d_ff=1408, router="softmax_topk", n_shared=1,
                                            shared_d_ff=5632, shared_gate=True, balance_coef=0.001)),
         14_315_784_192)
register("qwen2-57b-a14b", dict(QWEN_MOE, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
                                max_seq_len=131072,
                                moe=dict(n_experts=64, top_k=8, d_ff=2560, router="softmax_topk", n_shared=1,
                                         shared_d_ff=20480, shared_gate=True, balance_coef=0.001)))
register("qwen2-moe-tiny", dict(QWEN_MOE, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                d_ff=352, max_seq_len=512, eos_token_id=None,
                                moe=dict(n_experts=8, top_k=2, d_ff=64, router="softmax_topk", n_shared=1,
                                         shared_d_ff=128, shared_gate=True)))

# Switch Transformers (Fedus et al. 2021): T5 v1.0 (relu, tied and rescaled head) with top-1 experts on every
# second layer (1, 3, 5, ...) of both stacks, a fixed capacity of 64 tokens per expert per sequence, router jitter
# 0.01, z-loss and balance coefficients 0.001 (the released google/switch-base-8 config.json).
from llmarch.presets.t5 import T5  # noqa: E402

SWITCH_MOE = dict(n_experts=8, top_k=1, router="switch", expert_ffn="mlp", expert_capacity=64, jitter=0.01,
                  balance_coef=0.001, z_coef=0.001, every=2, offset=1)
SWITCH = dict(T5, ffn="moe", moe=SWITCH_MOE)
register("switch-base-8", dict(SWITCH, d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=3072))
register("switch-tiny", dict(SWITCH, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128,
                             rel_buckets=8, rel_max_distance=20, moe=dict(SWITCH_MOE, n_experts=4, expert_capacity=8)))

# Switch-C (Fedus et al. 2021, Table 9): 1571B parameters, 2048 experts on every layer (expert frequency 1),
# d 2080, 32 heads of 64, FFN 6144, 15 layers per stack; released config google/switch-c-2048. The count equals the
# paper's 1571B: 1,571,308,972,448 tensors (tied embedding counted once).
register("switch-c-2048", dict(SWITCH, d_model=2080, n_layers=15, n_heads=32, head_dim=64, d_ff=6144,
                               moe=dict(SWITCH_MOE, n_experts=2048, every=1, offset=0)), 1_571_308_972_448)
