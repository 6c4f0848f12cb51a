"""Layer-level parity of the Longformer and BigBird patterns with transformers' own attention layers, given the
same projection weights. (Full-model parity: tests/test_hf_sparse_models.py.)

BigBird is made deterministic this way: transformers draws its random blocks with numpy, seeded by the layer's
``seed`` in train mode (its block-sparse attention has no dropout, so train mode changes nothing else). We record
the table it draws and give it to our pattern. In eval mode transformers uses an all-zero table instead, which
points every random slot at block 0 a second time (counted twice in its softmax), so it is not a mask pattern.
"""
from __future__ import annotations

import torch
from transformers import BigBirdConfig, LongformerConfig
from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from llmarch.attention_config import SparseConfig
from llmarch.nn.block_sparse import block_sparse_attention
from llmarch.nn.patterns import build_pattern


def _heads(linear, x, H):
    B, T, _ = x.shape
    return linear(x).view(B, T, H, -1).transpose(1, 2)  # [B, H, T, Dh]


def test_longformer_pattern_matches_longformer_self_attention():
    torch.manual_seed(0)
    B, T, D, H, one_side = 2, 32, 32, 4, 4
    cfg = LongformerConfig(hidden_size=D, num_attention_heads=H, attention_window=[2 * one_side],
                           attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(cfg, layer_id=0).eval()
    with torch.no_grad():  # one set of projections: the pattern is what is compared
        for name in ("query", "key", "value"):
            getattr(layer, f"{name}_global").load_state_dict(getattr(layer, name).state_dict())
    x = torch.randn(B, T, D)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, 27:] = False  # right padding
    glob = torch.zeros(B, T, dtype=torch.bool)
    glob[0, [0, 19]] = True
    glob[1, 5] = True
    hf_mask = torch.zeros(B, T).masked_fill(~real, -10000.0).masked_fill(glob, 10000.0)
    with torch.no_grad():
        theirs = layer(x, attention_mask=hf_mask, is_index_masked=~real, is_index_global_attn=glob,
                       is_global_attn=True)[0]  # [B, T, D]
        q, k, v = (_heads(getattr(layer, n), x, H) for n in ("query", "key", "value"))
        pattern = build_pattern("longformer", window=one_side + 1, sparse=SparseConfig(block=8))
        ours = block_sparse_attention(q, k, v, pattern, pattern.plan(T, 8), block=8, scale=(D // H) ** -0.5,
                                      causal=False, key_padding=real, global_mask=glob)
    ours = ours.transpose(1, 2).reshape(B, T, D)
    assert (ours - theirs)[real].abs().max() < 1e-5


def test_bigbird_pattern_matches_block_sparse_attention(monkeypatch):
    torch.manual_seed(0)
    B, T, D, H, block, r = 2, 48, 32, 2, 4, 1
    cfg = BigBirdConfig(hidden_size=D, num_attention_heads=H, block_size=block, num_random_blocks=r,
                        max_position_embeddings=64, attention_type="block_sparse")
    layer = BigBirdBlockSparseAttention(cfg, seed=7).train()  # train mode: the seeded random draw
    drawn = []
    original = BigBirdBlockSparseAttention._bigbird_block_rand_mask_with_head
    monkeypatch.setattr(BigBirdBlockSparseAttention, "_bigbird_block_rand_mask_with_head",
                        lambda self, *a, **kw: drawn.append(original(self, *a, **kw)) or drawn[-1])
    x = torch.randn(B, T, D)
    ones = torch.ones(B, T)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(ones, block)
    with torch.no_grad():
        theirs = layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                       to_blocked_mask=blocked)[0]  # [B, T, D]
        q, k, v = (_heads(getattr(layer, n), x, H) for n in ("query", "key", "value"))
    nb = T // block
    (tables,) = drawn
    for h in range(H):
        table = torch.full((nb, r), -1, dtype=torch.long)
        table[1:-1] = torch.as_tensor(tables[h], dtype=torch.long)  # rows of the non-global query blocks
        pattern = build_pattern("bigbird", window=None, sparse=SparseConfig(block=block, random_blocks=r))
        pattern.random_table = lambda n, t=table: t
        with torch.no_grad():
            ours = block_sparse_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], pattern,
                                          pattern.plan(T, block), block=block, scale=(D // H) ** -0.5,
                                          causal=False)
        head = theirs.view(B, T, H, D // H)[:, :, h]
        assert (ours[:, 0] - head).abs().max() < 1e-5, f"head {h}"
