"""RETRO: chunked cross-attention against a per-token loop written here (the paper's m - 1 shift), causality of
neighbours and of retrieval in the loop, retrieval off / zero neighbours == the base decoder with the same weights,
generation with retrieval every chunk == recomputation, config and checkpoint round trips, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmarch
from llmarch.checkpoint import load_model, save_model
from llmarch.model import Model
from llmarch.retrieval import (ChunkIndex, ChunkedCrossAttention, EncoderEmbedder, Neighbours, RetroModel,
                               retrieve_neighbours, retro_generate)

M = 4  # chunk size
CFG = llmarch.preset("retro-tiny").replace(vocab_size=61, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=64,
                                           retrieval=dict(chunk_size=M, n_neighbours=2, neighbour_len=2 * M,
                                                          cca_layers=(0, 2), encoder_layers=1))


@pytest.fixture(scope="module")
def model():
    """A RETRO whose CCA outputs are no longer zero (as after some training), so neighbours change its logits."""
    torch.manual_seed(0)
    m = llmarch.build(CFG).eval()
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, ChunkedCrossAttention):
                module.out.weight.normal_(0.0, 0.02)
    return m


def test_a_fresh_retro_computes_its_base_decoder_even_with_neighbours():
    """The CCA output projections start at zero, so retrieval is learned from the base decoder's function."""
    torch.manual_seed(0)
    fresh = llmarch.build(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 4 * M))
    nb = torch.randint(0, CFG.vocab_size, (2, 4, 2, 2 * M))
    with torch.no_grad():
        with_nb = fresh(ids, neighbours=nb, neighbour_mask=torch.ones_like(nb)).logits
        without = fresh(ids).logits
    assert torch.equal(with_nb, without)
    assert all(not module.out.weight.any() for module in fresh.modules() if isinstance(module, ChunkedCrossAttention))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    torch.manual_seed(1)
    embed = EncoderEmbedder(llmarch.build(llmarch.preset("bert-tiny").replace(
        vocab_size=61, d_model=16, n_heads=2, d_ff=32, dropout=0.0, attn_dropout=0.0)))
    idx = ChunkIndex.create(tmp_path_factory.mktemp("idx") / "i", dim=16, chunk_size=M)
    idx.add(np.random.default_rng(0).integers(1, 61, size=M * 50), embed)
    return idx, embed


def rand(*shape, seed=0):
    return torch.randint(1, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_cca_equals_a_per_token_loop():
    torch.manual_seed(0)
    cca = ChunkedCrossAttention(16, 4, 2, 4, layer_idx=0, chunk_size=M, kernel="naive").eval()
    B, T, k, r = 2, 15, 2, 3
    x = torch.randn(B, T, 16)
    E = torch.randn(B, T // M, k * r, 16)
    memory = Neighbours(torch.zeros(B, T // M, k, r, dtype=torch.long), None, lambda ids, mask, chunks: (E, None))
    got = cca(x, type("Ctx", (), {"memory": memory})())
    q = cca.q(x).view(B, T, 4, 4)
    kk, vv = cca.kv(E).view(B, T // M, k * r, 2, 2, 4).unbind(3)  # [B, C, S, G, Dh]
    want = torch.zeros(B, T, 16)
    for t in range(T):
        u = (t + 1) // M - 1  # the last chunk token t has wholly seen
        if u < 0:
            continue
        for h in range(4):
            g = h // 2  # grouped kv heads
            p = torch.softmax(kk[:, u, :, g] @ q[:, t, h, :, None] / 2.0, dim=1)  # [B, S, 1]
            want[:, t] += (p * vv[:, u, :, g]).sum(1) @ cca.out.weight[:, h * 4:(h + 1) * 4].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_changing_neighbours_of_chunk_i_changes_nothing_before_its_last_token(model, chunk):
    ids = rand(2, 13)  # 3 complete chunks and one partial
    nb = rand(2, 3, 2, 2 * M, seed=1)
    other = nb.clone()
    other[:, chunk] = rand(2, 2, 2 * M, seed=2)
    with torch.no_grad():
        a, b = model(ids, neighbours=nb).logits, model(ids, neighbours=other).logits
    first_affected = (chunk + 1) * M - 1  # the paper's shift: the last token of chunk i sees its neighbours
    assert torch.equal(a[:, :first_affected], b[:, :first_affected])
    assert (a[:, first_affected] - b[:, first_affected]).abs().max() > 1e-4
    assert (a[:, first_affected:] - b[:, first_affected:]).abs().amax(-1).min() > 1e-6


def test_retrieval_in_the_loop_is_causal(model, index):
    idx, embed = index
    ids = rand(1, 16, seed=3)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] % 60) + 1  # in chunk 2
    outs = []
    for x in (ids, changed):
        nb, mask = retrieve_neighbours(idx, embed, x, k=2)
        with torch.no_grad():
            outs.append(model(x, neighbours=nb, neighbour_mask=mask).logits)
    assert torch.equal(outs[0][:, :9], outs[1][:, :9])
    assert (outs[0][:, 9:] - outs[1][:, 9:]).abs().max() > 1e-4


def test_retrieval_off_and_zero_neighbours_equal_the_base_decoder(model):
    base = Model(CFG.replace(retrieval=None)).eval()
    own = {k: v for k, v in model.state_dict().items() if ".cross" not in k and not k.startswith("neighbour_encoder")}
    base.load_state_dict(own, strict=True)  # every base weight is the RETRO model's
    ids = rand(2, 14)
    with torch.no_grad():
        want = base(ids).logits
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model(ids, neighbours=torch.zeros(2, 3, 0, 2 * M, dtype=torch.long)).logits, want)
        with_retrieval = model(ids, neighbours=rand(2, 3, 2, 2 * M)).logits
    assert torch.equal(with_retrieval[:, :M - 1], want[:, :M - 1])  # no token before m - 1 sees any neighbour
    assert (with_retrieval[:, M - 1:] - want[:, M - 1:]).abs().max() > 1e-4  # retrieval changes predictions
    assert torch.equal(llmarch.generate(model, ids, max_new_tokens=5), llmarch.generate(base, ids, max_new_tokens=5))


def test_padded_neighbours_are_masked(model):
    ids = rand(1, 8)
    nb = rand(1, 2, 2, 2 * M)
    mask = torch.ones_like(nb)
    mask[:, :, 1] = 0  # the second neighbour of each chunk is missing
    noisy = nb.clone()
    noisy[:, :, 1] = rand(1, 2, 2 * M, seed=9)
    with torch.no_grad():
        a = model(ids, neighbours=nb, neighbour_mask=mask).logits
        b = model(ids, neighbours=noisy, neighbour_mask=mask).logits
        none = model(ids, neighbours=nb, neighbour_mask=torch.zeros_like(mask)).logits
        plain = model(ids).logits  # also without a gradient: RMSNorm then runs one native kernel in both
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(none, plain, rtol=0, atol=0)


def test_retro_generate_retrieves_every_chunk(model, index):
    idx, embed = index
    calls = []

    def counting(chunks):
        calls.append(len(chunks))
        return embed(chunks)

    prompt = rand(1, 6, seed=4)
    out = retro_generate(model, prompt, idx, counting, max_new_tokens=7)
    assert out.shape == (1, 13) and calls == [1, 1, 1]  # the prompt's chunk, then chunks 2 and 3 as they complete
    seq = prompt
    for _ in range(7):  # recomputation: retrieve for the whole sequence at every step
        nb, mask = retrieve_neighbours(idx, embed, seq, k=2)
        with torch.no_grad():
            nxt = model(seq, neighbours=nb, neighbour_mask=mask).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_config_and_checkpoint_round_trip(model, tmp_path):
    assert llmarch.ModelConfig.from_dict(CFG.to_dict()) == CFG
    CFG.to_file(tmp_path / "c.yaml")
    assert llmarch.ModelConfig.from_file(tmp_path / "c.yaml") == CFG
    assert CFG.with_path("retrieval.cca_layers", "1,2").retrieval.cca_layers == (1, 2)
    save_model(model, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt")
    assert isinstance(again, RetroModel)
    ids, nb = rand(1, 9), rand(1, 2, 2, 2 * M)
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, neighbours=nb).logits, model(ids, neighbours=nb).logits)
    with pytest.raises(ValueError, match="retrieval"):
        llmarch.hf.save(model, tmp_path / "hf")


def test_errors(model):
    ids = rand(1, 9)
    with pytest.raises(ValueError, match="cache"):
        model(ids, neighbours=rand(1, 2, 2, 8), use_cache=True)
    with pytest.raises(ValueError, match="chunks >= 2"):
        model(ids, neighbours=rand(1, 1, 2, 8))
    with pytest.raises(ValueError, match="retrieval.cca_layers"):
        CFG.replace(retrieval=dict(cca_layers=(3,)))
    with pytest.raises(ValueError, match="kind='decoder'"):
        llmarch.preset("t5-tiny").replace(retrieval=CFG.retrieval)
    with pytest.raises(ValueError, match="unknown retrieval field"):
        llmarch.ModelConfig.from_dict(dict(CFG.to_dict(), retrieval=dict(chunk=3)))
