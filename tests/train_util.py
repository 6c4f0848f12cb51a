"""Shared tiny settings for the training tests: a 2-layer model and ~0.2 MB of the standard library."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.model import ModelOutput
from llmarch.train import TrainConfig

TINY = llmarch.preset("llama-tiny").replace(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                            max_seq_len=64)


def settings(out, cache, **changes) -> TrainConfig:
    base = dict(out=str(out), steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=2, max_data_mb=0.2, vocab_size=400,
                cache_dir=str(cache), eval_every=3, eval_batches=2, log_every=1, save_every=1000, progress=False,
                samples=0)
    base.update(changes)
    return TrainConfig(**base)


class StandIn(torch.nn.Module):
    """Until the encoder and encoder-decoder kinds land (issue 4): a decoder run over the sequences the way an
    encoder (MLM: reads input_ids and token_type_ids) or an encoder-decoder (reads input_ids, predicts from
    decoder_input_ids) would take them, so the objectives' loss plumbing trains end to end."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.inner = llmarch.build(cfg.replace(kind="decoder"))

    def forward(self, input_ids, token_type_ids=None, decoder_input_ids=None):
        if decoder_input_ids is None:
            out = self.inner(input_ids)
            return ModelOutput(out.logits, out.hidden_states, out.aux_loss)
        ids = torch.cat([input_ids, decoder_input_ids], dim=1)
        out = self.inner(ids)
        T = decoder_input_ids.shape[1]
        return ModelOutput(out.logits[:, -T:], out.hidden_states[:, -T:], out.aux_loss)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spinning threads that wait on each
    other (30x slower under load). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
