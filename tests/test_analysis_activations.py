"""The planner's activation bytes against what autograd actually saves for the backward (one process, tiny models):
``training_memory`` / ``mesh_plan`` activations within REL of the storages ``saved_tensors_hooks`` sees during one
forward and the training loss; with activation checkpointing, the block inputs the checkpoints hold plus what is
saved outside them, plus one block's recomputation. The tp=2 case runs in tests/dist_checks.py (``tp_tied``)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.analysis.activations import layer_activation_bytes_per_token, measure_saved_bytes, rotary_dim
from llmarch.analysis.memory import training_memory
from llmarch.analysis.parallel_plan import mesh_plan
from llmarch.train.objectives import ce_sum
from llmarch.train.optim import enable_activation_checkpointing

REL = 0.02  # the counts are exact per component; slack for int64 id storages wider than the batch
B, T = 2, 16
SMALL = dict(vocab_size=128, d_model=32, n_layers=2, max_seq_len=32)
CONFIGS = {
    "llama": ("llama-tiny", dict(SMALL, n_heads=4, n_kv_heads=2, d_ff=64)),  # RMSNorm, RoPE, GQA, SwiGLU
    "gpt2": ("gpt2-tiny", dict(SMALL, n_heads=4, d_ff=128)),  # LayerNorm, learned positions, GELU MLP, biases
    "bloom": ("bloom-tiny", dict(SMALL, n_heads=4, d_ff=128)),  # ALiBi score bias per layer, embedding norm
    "mixtral": ("mixtral-tiny", dict(SMALL, n_heads=4, n_kv_heads=2, d_ff=64)),  # top-2 of 4 experts, sorted dispatch
    "qwen2_moe": ("qwen2-moe-tiny", dict(SMALL, n_heads=4, n_kv_heads=2)),  # + a gated shared expert
    "partial_rope_gelu_glu": ("llama-tiny", dict(SMALL, n_heads=4, d_ff=64, activation="gelu",
                                                  rope=dict(fraction=0.5), norm="rmsnorm_zero")),
    # Mamba-2's chunked scan: two whole chunks (its reshapes copy), then three chunks over padded slots
    "mamba2": ("mamba2-tiny", dict(SMALL, ssm=dict(head_dim=16, d_state=8, n_groups=2, chunk_size=8))),
    "mamba2_padded": ("mamba2-tiny", dict(SMALL, ssm=dict(head_dim=8, d_state=16, n_groups=1, chunk_size=6))),
    # Qwen3-Next-like: gated delta layers (two whole chunks; one padded chunk) and a gated attention layer
    "gated_delta": ("qwen3-next-tiny", dict(SMALL, n_heads=4, n_kv_heads=2, layer_mixers=["gated_delta"],
                                            linear=dict(n_k_heads=2, n_v_heads=4, k_head_dim=8, v_head_dim=12,
                                                        chunk_size=8))),
    "gated_delta_padded": ("qwen3-next-tiny", dict(SMALL, n_heads=4, n_kv_heads=2,
                                                   layer_mixers=["gated_delta", "gated_attention"],
                                                   linear=dict(n_k_heads=2, n_v_heads=2, k_head_dim=16,
                                                               v_head_dim=8, chunk_size=32))),
    # latent attention: q latent, Dv != Dn + Dr (SDPA's math path on CPU); no q latent, Dv = Dn + Dr (fused)
    "latent": ("deepseek-v2-tiny", dict(SMALL, n_heads=4)),
    "latent_fused": ("deepseek-v2-tiny", dict(SMALL, n_heads=4, mla=dict(kv_lora_rank=16, q_lora_rank=None,
                                                                         qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                                         v_head_dim=16))),
}


def saved(model) -> int:
    """Bytes autograd saves for one forward and the training loss on a [B, T] batch."""
    ids = torch.randint(0, SMALL["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
    return measure_saved_bytes(lambda: ce_sum(model(ids[:, :-1]).logits, ids[:, 1:]), model.parameters())


def close(measured: float, planned: float) -> bool:
    return abs(measured - planned) <= REL * measured


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_planned_activations_equal_saved_tensors(name):
    preset, kw = CONFIGS[name]
    cfg = llmarch.preset(preset, **kw)
    torch.manual_seed(0)
    got = saved(llmarch.build(cfg))
    planned = training_memory(cfg, T, B, "fp32")["activations"]
    assert close(got, planned), (name, got, planned)
    assert mesh_plan(cfg, T, B, "fp32")["activations"] == planned  # one process: the mesh planner agrees


def test_planned_activations_in_bf16():
    cfg = llmarch.preset("llama-tiny", **CONFIGS["llama"][1])
    torch.manual_seed(0)
    got = saved(llmarch.build(cfg, dtype=torch.bfloat16))
    planned = training_memory(cfg, T, B, "bf16")["activations"]
    assert close(got, planned), (got, planned)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_checkpointed_activations_are_block_inputs_plus_one_block(name):
    """Checkpointed blocks keep only their input [B, T, D] for the recomputation, which then saves what one plain
    block saves (measured above)."""
    preset, kw = CONFIGS[name]
    cfg = llmarch.preset(preset, **kw)
    torch.manual_seed(0)
    model = llmarch.build(cfg)
    assert enable_activation_checkpointing(model) == cfg.n_layers
    tables = 2 * B * T * rotary_dim(cfg) * 4  # RoPE's fp32 cos|sin, held by the context the checkpoints keep
    held = saved(model) + tables  # checkpoints save each block's input [B, T, D] and nothing inside the block
    one_block = B * T * max(layer_activation_bytes_per_token(cfg, i, 4.0) for i in range(cfg.n_layers))
    planned = training_memory(cfg, T, B, "fp32")["activations_checkpointed"]
    assert close(held + one_block, planned), (held, one_block, planned)
    assert planned < training_memory(cfg, T, B, "fp32")["activations"]
