"""Attention weights as an output (output_attentions), equal to transformers' for a decoder, an encoder and an
encoder-decoder's self- and cross-attention; rows sum to one; the recording leaves the logits and the kernels as
they were."""
from __future__ import annotations

import pytest
import torch

import llmarch
from tests.hf_util import make_hf_model, padded_batch

BASE = dict(vocab_size=211, d_model=48, n_layers=2, n_heads=4, d_ff=96, max_seq_len=64)


def _real_rows(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference over real queries and real keys."""
    real = mask.bool()
    pair = real[:, None, :, None] & real[:, None, None, :]
    return (ours - theirs).abs().masked_select(pair.expand_as(ours)).max().item()


@pytest.mark.parametrize("preset,model_type,stack", [("gpt2-tiny", "gpt2", "decoder"),
                                                      ("llama-tiny", "llama", "decoder"),
                                                      ("bert-tiny", "bert", "encoder")])
def test_attention_weights_match_transformers(preset, model_type, stack, tmp_path):
    cfg = llmarch.preset(preset).replace(**BASE)
    hf_model, path = make_hf_model(cfg, model_type, tmp_path,
                                   model_class="BertForPreTraining" if model_type == "bert" else None)
    ours = llmarch.hf.load(path).eval()
    ids, mask = padded_batch(cfg.vocab_size, lengths=(9, 5))
    if stack == "encoder":  # right padding for the encoder
        ids, mask = ids.flip(-1), mask.flip(-1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {} if stack == "encoder" else {"position_ids": pos}
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, output_attentions=True, **kw).attentions
        out = ours(ids, attention_mask=mask, output_attentions=True)
        plain = ours(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)  # the reference kernel, same math
    assert all(m.kernel_name == "sdpa" and m.kernel is llmarch.nn.KERNELS["sdpa"]
               for n, m in ours.named_modules() if hasattr(m, "kernel_name"))  # kernels restored
    names = [f"{stack}.layers.{i}.attn" for i in range(cfg.n_layers)]
    assert list(out.attentions) == names
    for name, ref in zip(names, theirs):
        w = out.attentions[name]
        assert w.shape == ref.shape
        assert _real_rows(w, ref, mask) < 1e-5
        rows = w.sum(-1)[mask.bool()[:, None, :].expand(-1, cfg.n_heads, -1)]
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_cross_attention_weights_match_t5(tmp_path):
    cfg = llmarch.preset("t5-tiny").replace(**BASE)
    hf_model, path = make_hf_model(cfg, "t5", tmp_path, model_class="T5ForConditionalGeneration")
    ours = llmarch.hf.load(path).eval()
    ids, mask = padded_batch(cfg.vocab_size, lengths=(9, 5))
    ids, mask = ids.flip(-1), mask.flip(-1)
    dec = torch.randint(1, cfg.vocab_size, (2, 4))
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
        out = ours(ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
    for i in range(cfg.n_layers):
        torch.testing.assert_close(out.attentions[f"decoder.layers.{i}.attn"], ref.decoder_attentions[i])
        cross = out.attentions[f"decoder.layers.{i}.cross"]
        keys = mask.bool()[:, None, None, :].expand_as(cross)
        assert (cross - ref.cross_attentions[i]).abs().masked_select(keys).max() < 1e-5


def test_block_sparse_execution_refuses_to_invent_weights():
    cfg = llmarch.preset("gpt3-tiny")
    model = llmarch.build(cfg).eval()
    with pytest.raises(ValueError, match="sparse.execution"):
        model(torch.randint(0, cfg.vocab_size, (1, 16)), output_attentions=True)


def test_plot_attention_cli_draws_every_layer_and_head(tmp_path):
    from llmarch.checkpoint import save_model
    from llmarch.cli import main
    from llmarch.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=300)
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=tok.vocab_size, n_layers=2)
    save_model(llmarch.build(cfg), tmp_path / "m")
    tok.save(tmp_path / "m")
    out = tmp_path / "attn.png"
    assert main(["plot", "attention", "--checkpoint", str(tmp_path / "m"), "--prompt", "the cat sat",
                 "-o", str(out)]) == 0
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 4 * 100  # 2 layer rows, 4 head columns
    assert main(["plot", "attention", "--checkpoint", str(tmp_path / "m"), "--prompt", "the cat",
                 "--layers", "5", "-o", str(out)]) == 2  # a bad layer is a message, not a traceback
