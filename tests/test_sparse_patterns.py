"""Sparse attention patterns: each rule against the paper's definition written out here, and the block-sparse
execution against the dense masked reference (outputs and gradients), on lengths that are not multiples of the
block, with GQA, padding, causal and bidirectional attention."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.attention_config import SparseConfig
from llmarch.nn.attention import AttnContext
from llmarch.nn.block_sparse import block_sparse_attention
from llmarch.nn.execution import EXECUTIONS
from llmarch.nn.kernels import KERNELS
from llmarch.nn.patterns import PATTERNS, build_pattern
from llmarch.nn.position import NoPositions

SPARSE = SparseConfig(block=8, stride=6, summary=2, global_tokens=(0, 13), random_blocks=1, seed=3)
WINDOW = 5


def naive_rule(name: str, i: int, j: int, n: int) -> bool:
    """The patterns as the papers define them, one (query, key) pair at a time."""
    s, b = SPARSE, SPARSE.block
    if name == "sliding":
        return abs(i - j) < WINDOW
    if name == "strided":  # Child et al. 2019: previous l positions, and every l-th one
        return abs(i - j) < s.stride or (i - j) % s.stride == 0
    if name == "fixed":  # own block of l, plus the last c positions of every block
        return i // s.stride == j // s.stride or j % s.stride >= s.stride - s.summary
    if name == "blockwise":
        return i // b == j // b
    if name == "longformer":
        g = set(s.global_tokens)
        return abs(i - j) < WINDOW or i in g or j in g
    if name == "bigbird":
        nb = -(-n // b)
        qb, kb = i // b, j // b
        glob = {g % nb for g in s.global_blocks}
        rand = build_pattern("bigbird", window=None, sparse=s).random_table(nb)[qb].tolist()
        return abs(qb - kb) <= 1 or qb in glob or kb in glob or kb in rand
    raise KeyError(name)


SPARSE_NAMES = ["sliding", "strided", "fixed", "blockwise", "longformer", "bigbird"]


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_render_matches_the_papers_definition(name):
    n = 29
    pattern = build_pattern(name, window=WINDOW, sparse=SPARSE)
    expected = torch.tensor([[naive_rule(name, i, j, n) for j in range(n)] for i in range(n)])
    assert torch.equal(pattern.render(n, causal=False), expected)
    assert torch.equal(pattern.render(n), expected & torch.ones(n, n, dtype=torch.bool).tril())


def test_every_pattern_is_covered_here():
    assert set(PATTERNS) == {"dense", "random", *SPARSE_NAMES}  # random: tests/test_random_pattern.py


def _inputs(B=2, H=4, G=2, T=37, Dh=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dh, generator=g, dtype=torch.float32).requires_grad_()
    k = torch.randn(B, G, T, Dh, generator=g, dtype=torch.float32).requires_grad_()
    v = torch.randn(B, G, T, Dv, generator=g, dtype=torch.float32).requires_grad_()
    return q, k, v


def _reference(q, k, v, pattern, causal, padding, glob):
    T = q.shape[2]
    ctx = AttnContext(0, T, NoPositions(), torch.zeros(q.shape[0], T, dtype=torch.long), padding, causal=causal,
                      device=q.device, global_mask=glob)
    return EXECUTIONS["mask"](q, k, v, ctx, pattern, 0, kernel=KERNELS["naive"], scale=0.3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_block_sparse_equals_dense_mask(name, causal):
    T = 37  # not a multiple of the block (8), the stride (6) or the window
    pattern = build_pattern(name, window=WINDOW, sparse=SPARSE)
    padding = torch.ones(2, T, dtype=torch.bool)
    padding[1, :4] = False  # a left-padded row
    glob = torch.zeros(2, T, dtype=torch.bool)
    glob[1, [20, 30]] = True  # per-batch global tokens (used by longformer only)
    real = padding[:, None, :, None].float()
    weight = torch.randn(2, 4, T, 6, dtype=torch.float32)

    q, k, v = _inputs(T=T)
    ref = _reference(q, k, v, pattern, causal, padding, glob)
    ref_grads = torch.autograd.grad((ref * real * weight).sum(), (q, k, v))
    out = block_sparse_attention(q, k, v, pattern, pattern.plan(T, SPARSE.block), block=SPARSE.block, scale=0.3,
                                 causal=causal, key_padding=padding, global_mask=glob)
    grads = torch.autograd.grad((out * real * weight).sum(), (q, k, v))
    assert (out - ref).mul(real).abs().max() < 1e-5
    for a, b, what in zip(grads, ref_grads, "qkv"):
        assert (a - b).abs().max() < 1e-5, f"grad wrt {what}"


def test_longformer_per_batch_globals_change_the_result():
    """The global_attention_mask really reaches the pattern (a global token sees the whole row)."""
    T = 30
    pattern = build_pattern("longformer", window=3, sparse=SparseConfig(block=8))
    q, k, v = _inputs(T=T)
    glob = torch.zeros(2, T, dtype=torch.bool)
    glob[0, 25] = True
    plan = pattern.plan(T, 8)
    with_g = block_sparse_attention(q, k, v, pattern, plan, block=8, scale=0.3, causal=False, global_mask=glob)
    without = block_sparse_attention(q, k, v, pattern, plan, block=8, scale=0.3, causal=False)
    changed = (with_g - without).abs().amax(dim=(1, 3)) > 1e-9  # [B, T]
    assert changed[0, 25] and changed[0, :20].any() and not changed[1].any()


def test_bigbird_random_blocks_are_seeded_and_avoid_window_and_globals():
    a = build_pattern("bigbird", window=None, sparse=SparseConfig(block=4, random_blocks=2, seed=1))
    b = build_pattern("bigbird", window=None, sparse=SparseConfig(block=4, random_blocks=2, seed=1))
    c = build_pattern("bigbird", window=None, sparse=SparseConfig(block=4, random_blocks=2, seed=2))
    ta, nb = a.random_table(16), 16
    assert torch.equal(ta, b.random_table(16)) and not torch.equal(ta, c.random_table(16))
    for i, row in enumerate(ta.tolist()):
        assert len(set(row)) == 2 and all(abs(i - j) > 1 and j not in (0, nb - 1) for j in row)


@pytest.mark.parametrize("pattern", [("dense", "longformer"), ("strided",), ("bigbird", "sliding")])
def test_model_blocks_execution_equals_mask_execution(pattern):
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                               d_ff=64, pattern=pattern, window=4,
                                               sparse=dict(block=4, stride=5, summary=2, global_tokens=(1,),
                                                           random_blocks=1))
    torch.manual_seed(0)
    ref = llmarch.build(cfg).eval()
    fast = llmarch.build(cfg.replace(sparse=dict(execution="blocks"))).eval()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 101, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :5] = 0
    glob = torch.zeros(2, 23, dtype=torch.long)
    glob[0, 17] = 1
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, global_attention_mask=glob).logits
        b = fast(ids, attention_mask=mask, global_attention_mask=glob).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-4
    gen_ref = llmarch.generate(ref, ids[:, :9], max_new_tokens=6)
    assert torch.equal(llmarch.generate(fast, ids[:, :9], max_new_tokens=6), gen_ref)


def test_bad_sparse_settings_name_the_field():
    with pytest.raises(ValueError, match="sparse.summary"):
        SparseConfig(stride=4, summary=5).validate()
    with pytest.raises(ValueError, match="sparse.execution"):
        llmarch.preset("llama-tiny").replace(sparse=dict(execution="flex"))
    with pytest.raises(ValueError, match="window"):
        llmarch.preset("llama-tiny").replace(pattern=("longformer",))
