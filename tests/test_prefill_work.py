"""Work a prefill or decode step no longer does: ``logits_to_keep`` runs the head on the last positions only (what
``generate``'s prefill asks for), and RoPE serves a step whose positions are a known range from a table kept
across steps, with the values of computing them afresh."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.config import RopeConfig
from llmarch.nn.rope import RotaryEmbedding

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=256)


def _model(name="llama-tiny", **over):
    torch.manual_seed(0)
    return llmarch.build(llmarch.preset(name).replace(**{**SMALL, **over})).eval()


@pytest.mark.parametrize("n", [1, 3, 9])
def test_logits_to_keep_is_the_last_positions_of_the_full_logits(n):
    model = _model()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cut = model(ids, attention_mask=mask, logits_to_keep=n)
    assert cut.logits.shape == (2, min(n, 7), 64) and cut.hidden_states.shape == full.hidden_states.shape
    torch.testing.assert_close(cut.logits, full.logits[:, -n:], rtol=1e-6, atol=1e-6)


def test_encoder_decoders_keep_the_decoder_positions():
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("t5-tiny")).eval()
    src, tgt = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        full = model(src, decoder_input_ids=tgt)
        cut = model(src, decoder_input_ids=tgt, logits_to_keep=2)
    torch.testing.assert_close(cut.logits, full.logits[:, -2:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_logits_to_keep_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="logits_to_keep"):
        _model()(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=bad)


@pytest.mark.parametrize("head", ["last_token", "classification"])
def test_heads_that_read_other_positions_refuse_it(head):
    cfg = llmarch.preset("llama-tiny").replace(**SMALL, head=head) if head == "last_token" else \
        llmarch.preset("bert-tiny").replace(head=head)
    model = llmarch.build(cfg).eval()
    with pytest.raises(ValueError, match="logits_to_keep: the .*Head reads positions"):
        model(torch.ones(1, 3, dtype=torch.long), logits_to_keep=1)


def test_generate_runs_the_head_on_one_position_per_step(monkeypatch):
    """The prefill's head sees one position per row; the tokens are those of a prefill that computed them all."""
    model = _model()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    rows = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    got = llmarch.generate(model, ids, 4)
    hook.remove()
    assert rows == [1, 1, 1, 1]
    from llmarch.infer import decode
    monkeypatch.setattr(decode, "last_logits", lambda model: 0)
    assert torch.equal(llmarch.generate(model, ids, 4), got)


SCALINGS = [RopeConfig(), RopeConfig(scaling="linear", factor=2.0),
            RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=64),
            RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_seq_len=64),
            RopeConfig(fraction=0.5)]


@pytest.mark.parametrize("rope", SCALINGS, ids=["plain", "linear", "yarn", "llama3", "partial"])
@pytest.mark.parametrize("dim", [16, 24, 64])
def test_a_range_reads_the_table_with_the_values_computed_afresh(rope, dim):
    r = RotaryEmbedding(dim, rope, 128)
    with torch.no_grad():
        for start, T in [(0, 5), (3, 1), (63, 1), (64, 2), (1000, 1), (1001, 70)]:
            ids = torch.arange(start, start + T)[None].expand(3, T)
            got, want = r(ids, start), r(ids)
            assert got.cos.shape == (1, 1, T, want.cos.shape[-1])
            assert torch.equal(got.cos[0], want.cos[0]) and torch.equal(got.sin[0], want.sin[0])


def test_the_table_is_kept_across_steps_and_remade_when_stale():
    r = RotaryEmbedding(16, RopeConfig(), 128)
    ids = lambda p: torch.tensor([[p]])  # noqa: E731
    with torch.no_grad():
        first = r(ids(10), 10)
        later = r(ids(40), 40)
        assert later.cos.untyped_storage().data_ptr() == first.cos.untyped_storage().data_ptr()
        assert r(ids(74), 74).cos.untyped_storage().data_ptr() != first.cos.untyped_storage().data_ptr()
        r.inv_freq.mul_(0.5)  # in place: the table is stale
        torch.testing.assert_close(r(ids(75), 75).cos, r(ids(75)).cos, rtol=0, atol=0)
        assert not torch.equal(r(ids(75), 75).cos, first.cos)
    r._table = None
    r(ids(3), 3)  # with a gradient: computed afresh, no table made
    assert r._table is None
    dynamic = RotaryEmbedding(16, RopeConfig(scaling="dynamic", factor=2.0), 8)
    with torch.no_grad():  # dynamic NTK: the frequencies depend on the longest position, never a table
        dynamic(ids(20), 20)
    assert getattr(dynamic, "_table", None) is None


def test_decode_steps_rotate_from_the_table_and_match_a_fresh_one(monkeypatch):
    """Greedy steps of a model with scaled RoPE: the same logits with the table as with every rotation computed
    afresh."""
    model = _model(rope=RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=64))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    got = llmarch.generate(model, ids, 70)
    rotary = model.decoder.positions.rotary
    monkeypatch.setattr(type(rotary), "forward", lambda self, position_ids, start=None: self._rotation(position_ids))
    assert torch.equal(llmarch.generate(model, ids, 70), got)
