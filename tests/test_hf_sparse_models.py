"""Full-model parity with transformers' Longformer and BigBird (fp32, logits within 1e-4 on padded batches), the
HF model built from our config by the production translator and loaded with llmarch.hf.load; save round trips
reload in transformers; preset parameter counts equal transformers' on the meta device.

BigBird's block-sparse attention draws random key blocks (per layer and head); it is made deterministic two ways:
1. transformers' own draw: in train mode (dropout 0, so nothing else changes) each layer seeds numpy with its
   index; we record the tables it draws and give each of our layers a pattern holding its table. Our random
   blocks are shared by the heads, so this runs with one head.
2. our draw: transformers' table function is replaced by one returning our pattern's seeded table for every head,
   in eval mode (where transformers would otherwise use an all-zero table, block 0 counted r + 1 times).
Short sequences (at most 5 + 2r blocks) take transformers' full-attention fallback (``original_full``), which our
pattern follows through ``sparse.dense_up_to_blocks``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

import llmarch
from llmarch.hf.io import family
from llmarch.nn.patterns import build_pattern
from tests.hf_util import TOL, assert_same_weights, make_hf_model

SMALL = dict(vocab_size=211, d_model=48, n_layers=2, n_heads=4, d_ff=96, dropout=0.0, attn_dropout=0.0)
LONGFORMER = llmarch.preset("roberta-tiny").replace(**SMALL, max_seq_len=66, pattern=("longformer",), window=4,
                                                    mixer="longformer")  # attention_window 6
BIGBIRD = llmarch.preset("bert-tiny").replace(**SMALL, max_seq_len=128, activation="gelu_tanh", pattern=("bigbird",),
                                              sparse=dict(block=4, random_blocks=1, dense_up_to_blocks=7))


def padded_batch(cfg, T: int, lengths: tuple[int, ...], seed: int = 0):
    """Right-padded ids [B, T] (pad_token_id in the padding, never inside a row) and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, cfg.pad_token_id), mask


def max_diff(a, b, mask):
    return (a[mask.bool()] - b[mask.bool()]).abs().max().item()


def with_execution(model, execution: str, **sparse):
    """The same weights under another sparse.execution (and execution tile)."""
    other = llmarch.build(model.config.replace(sparse=dict(sparse, execution=execution))).eval()
    other.load_state_dict(model.state_dict())
    return other


# --- Longformer -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def longformer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("longformer")
    hf_model, path = make_hf_model(LONGFORMER, "longformer", tmp, model_class="LongformerForMaskedLM")
    return hf_model, llmarch.hf.load(path).eval(), tmp


def longformer_inputs(cfg):
    ids, mask = padded_batch(cfg, 21, (21, 15, 6))  # 21: not a multiple of attention_window (6) nor of block 8
    glob = torch.zeros_like(mask)
    glob[:, 0] = 1  # <s>
    glob[0, [7, 13]] = 1
    glob[1, 3] = 1
    return ids, mask, glob


@pytest.mark.parametrize("execution", ["mask", "blocks"])
def test_longformer_mlm_matches_with_global_tokens_and_padding(longformer, execution):
    hf_model, ours, _ = longformer
    assert ours.config == LONGFORMER
    ids, mask, glob = longformer_inputs(LONGFORMER)
    mine = with_execution(ours, execution, block=8)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
        out = mine(ids, attention_mask=mask, global_attention_mask=glob)
        base = hf_model.longformer(input_ids=ids, attention_mask=mask, global_attention_mask=glob)
        local = hf_model(input_ids=ids, attention_mask=mask).logits  # no global tokens at all
        local_ours = mine(ids, attention_mask=mask).logits
    assert max_diff(out.logits, theirs.logits, mask) <= TOL[torch.float32]
    assert max_diff(out.hidden_states, base.last_hidden_state, mask) <= TOL[torch.float32]  # LongformerModel
    assert max_diff(local_ours, local, mask) <= TOL[torch.float32]


def test_longformer_global_rows_need_their_own_projections(longformer):
    """The same weights without the global projections (global rows from q/k/v) are far off: the test can fail."""
    hf_model, ours, _ = longformer
    plain = llmarch.build(LONGFORMER.replace(mixer="attention")).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "qkv_global" not in k})
    ids, mask, glob = longformer_inputs(LONGFORMER)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
        assert max_diff(plain(ids, attention_mask=mask, global_attention_mask=glob).logits, theirs, mask) > 1e-2


def test_longformer_save_reloads_in_transformers(longformer):
    hf_model, ours, tmp = longformer
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = transformers.LongformerForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.attention_window == [6, 6]
    ids, mask, glob = longformer_inputs(LONGFORMER)
    with torch.no_grad():
        theirs = reloaded(input_ids=ids, attention_mask=mask, global_attention_mask=glob).logits
        assert max_diff(ours(ids, attention_mask=mask, global_attention_mask=glob).logits, theirs, mask) <= 1e-4
    again = llmarch.hf.load(out)
    assert again.config == LONGFORMER
    assert_same_weights(ours, again)


def test_longformer_refuses_what_it_cannot_express():
    fam = family("longformer")
    assert "mixer" in fam.accepts(LONGFORMER.replace(mixer="attention"))
    assert "global_tokens" in fam.accepts(LONGFORMER.replace(sparse=dict(global_tokens=(0,))))
    with pytest.raises(ValueError, match="attention_window"):
        fam.to_config(dict(fam.from_config(LONGFORMER), attention_window=[6, 8]))
    with pytest.raises(ValueError, match="mixer"):
        LONGFORMER.replace(pattern=("sliding",))


# --- BigBird ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("mlm", "BigBirdForMaskedLM"), ("pretraining", "BigBirdForPreTraining")])
def bigbird(request, tmp_path_factory):
    head, cls = request.param
    cfg = BIGBIRD.replace(head=head)
    tmp = tmp_path_factory.mktemp(f"bigbird-{head}")
    hf_model, path = make_hf_model(cfg, "big_bird", tmp, model_class=cls)
    return cfg, cls, hf_model, llmarch.hf.load(path).eval(), tmp


def bigbird_logits(cfg, out):
    return out.prediction_logits if cfg.head == "pretraining" else out.logits


def compare_bigbird(cfg, hf_model, ours, ids, mask, execution="mask"):
    mine = with_execution(ours, execution)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask)
        out = mine(ids, attention_mask=mask)
    assert max_diff(out.logits, bigbird_logits(cfg, theirs), mask) <= TOL[torch.float32]
    if cfg.head == "pretraining":
        assert (out.nsp_logits - theirs.seq_relationship_logits).abs().max() <= TOL[torch.float32]


@pytest.mark.parametrize("execution", ["mask", "blocks"])
def test_bigbird_short_sequence_takes_full_attention_like_transformers(bigbird, execution):
    """22 tokens = 6 blocks <= 5 + 2r: transformers falls back to original_full, where the bigbird pattern would
    still be sparse; sparse.dense_up_to_blocks makes ours dense too."""
    cfg, _, hf_model, ours, _ = bigbird
    assert ours.config == cfg
    ids, mask = padded_batch(cfg, 22, (22, 17, 9))
    compare_bigbird(cfg, hf_model, ours, ids, mask, execution)
    assert hf_model.bert.attention_type == "original_full"
    hf_model.bert.set_attention_type("block_sparse")  # the fallback sticks to the module; undo it


@pytest.mark.parametrize("execution", ["mask", "blocks"])
def test_bigbird_block_sparse_with_our_random_blocks(bigbird, execution, monkeypatch):
    """45 tokens = 12 blocks: block-sparse in transformers, fed our pattern's seeded table for every layer/head."""
    cfg, _, hf_model, ours, _ = bigbird
    table = ours.encoder.layers[0].attn.pattern.random_table(12)  # [nb, r]
    monkeypatch.setattr(BigBirdBlockSparseAttention, "_bigbird_block_rand_mask_with_head",
                        lambda self, *a, num_heads, **kw: [table[1:-1].numpy().astype(np.int32)] * num_heads)
    ids, mask = padded_batch(cfg, 45, (45, 38, 20))
    compare_bigbird(cfg, hf_model, ours, ids, mask, execution)
    assert hf_model.bert.attention_type == "block_sparse"


@pytest.mark.parametrize("execution", ["mask", "blocks"])
def test_bigbird_block_sparse_with_transformers_random_blocks(tmp_path, execution, monkeypatch):
    """transformers' own seeded draw (train mode, dropout 0), recorded per layer and handed to our layers. One
    head: transformers draws per head, our pattern shares its blocks across heads."""
    cfg = BIGBIRD.replace(n_heads=1, head="mlm")
    hf_model, path = make_hf_model(cfg, "big_bird", tmp_path, model_class="BigBirdForMaskedLM")
    ours = llmarch.hf.load(path).eval()
    drawn = []
    original = BigBirdBlockSparseAttention._bigbird_block_rand_mask_with_head
    monkeypatch.setattr(BigBirdBlockSparseAttention, "_bigbird_block_rand_mask_with_head",
                        lambda self, *a, **kw: drawn.append(original(self, *a, **kw)) or drawn[-1])
    ids, mask = padded_batch(cfg, 45, (45, 38, 20))
    hf_model.train()
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits
    assert len(drawn) == cfg.n_layers and hf_model.bert.attention_type == "block_sparse"
    mine = with_execution(ours, execution)
    for layer, (heads,) in zip(mine.encoder.layers, drawn):
        table = torch.full((12, 1), -1, dtype=torch.long)
        table[1:-1] = torch.as_tensor(heads, dtype=torch.long)  # rows of the non-global query blocks
        pattern = build_pattern("bigbird", window=None, sparse=cfg.sparse)
        pattern.random_table = lambda nb, t=table: t
        layer.attn.pattern = pattern
    assert not torch.equal(torch.as_tensor(drawn[0][0]), torch.as_tensor(drawn[1][0]))  # layers draw differently
    with torch.no_grad():
        assert max_diff(mine(ids, attention_mask=mask).logits, theirs, mask) <= TOL[torch.float32]


def test_bigbird_save_reloads_in_transformers(bigbird):
    cfg, cls, _, ours, tmp = bigbird
    out = llmarch.hf.save(ours, tmp / "saved")
    reloaded = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.attention_type == "block_sparse" and reloaded.config.num_random_blocks == 1
    ids, mask = padded_batch(cfg, 22, (22, 17, 9))
    compare_bigbird(cfg, reloaded, ours, ids, mask)
    again = llmarch.hf.load(out)
    assert again.config == cfg
    assert_same_weights(ours, again)


def test_bigbird_original_full_config_is_dense():
    fam = family("big_bird")
    hf = dict(fam.from_config(BIGBIRD), attention_type="original_full")
    assert fam.to_config(hf).pattern == ("dense",)
    assert fam.from_config(fam.to_config(hf))["attention_type"] == "original_full"
    assert "dense_up_to_blocks" in fam.accepts(BIGBIRD.replace(sparse=dict(dense_up_to_blocks=0)))


# --- presets ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,model_type,cls", [("longformer-base", "longformer", "LongformerForMaskedLM"),
                                                 ("bigbird-roberta-base", "big_bird", "BigBirdForPreTraining")])
def test_preset_parameter_count_equals_transformers(name, model_type, cls):
    """Built on the meta device from the translated config: the same parameter count, and the config survives
    the translation both ways (execution is ours alone: a loaded model runs the reference 'mask' path)."""
    cfg = llmarch.preset(name)
    fam = family(model_type)
    assert fam.accepts(cfg) is None
    hf_cfg = transformers.AutoConfig.for_model(**fam.from_config(cfg))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in getattr(transformers, cls)(hf_cfg).parameters())
    assert sum(p.numel() for p in llmarch.build(cfg, device="meta").parameters()) == theirs
    assert fam.to_config(fam.from_config(cfg)) == cfg.replace(sparse=dict(execution="mask"))
