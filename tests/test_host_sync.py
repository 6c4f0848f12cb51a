"""No host syncs where the device is an accelerator: with ``host_reads_ok`` answering as it does on a GPU, the
forward, the loss and the backward read no tensor value back into Python, and a training step reads back once.
(On the CPU the same code reads freely: those reads are memory loads, and they give the eager ValueErrors.)"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import llmarch
from llmarch.nn import device
from llmarch.train import Trainer
from llmarch.train.objectives import ce_sum
from tests.train_util import TINY, settings

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
USERS = ("llmarch.model_inputs", "llmarch.nn.position", "llmarch.nn.dispatch", "llmarch.train.loop")


@pytest.fixture
def as_on_gpu(monkeypatch):
    """Pretend every tensor lives on an accelerator (for the reads-are-free test) and count value reads."""
    import importlib

    for name in USERS:
        monkeypatch.setattr(importlib.import_module(name), "host_reads_ok", lambda t: False)
    counts = {"n": 0, "where": []}
    for attr in READS:
        original = getattr(torch.Tensor, attr)

        def counting(self, *a, _original=original, _attr=attr, **k):
            caller = sys._getframe(1).f_code.co_filename
            if f"torch{os.sep}optim" not in caller:  # the optimizers' step counters are host tensors by design
                counts["n"] += 1
                counts["where"].append(_attr)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counting)
    return counts


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "mixtral-tiny"])
def test_forward_loss_backward_read_nothing_back(preset, as_on_gpu):
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset(preset)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    as_on_gpu["n"], as_on_gpu["where"] = 0, []
    out = model(ids[:, :-1], attention_mask=mask[:, :-1])
    loss = ce_sum(out.logits, ids[:, 1:]) + out.aux_loss
    loss.backward()
    assert as_on_gpu["n"] == 0, as_on_gpu["where"]


def test_device_checks_still_refuse_bad_ids(as_on_gpu):
    model = llmarch.build(llmarch.preset("llama-tiny", vocab_size=50, d_model=32, n_layers=1, d_ff=64))
    with pytest.raises(RuntimeError, match="input_ids: a token id is outside the vocabulary"):
        model(torch.tensor([[1, 2, 50]]))


def test_a_training_step_reads_back_once(tmp_path, as_on_gpu):
    trainer = Trainer(TINY, settings(tmp_path / "run", tmp_path / "cache", steps=2, grad_accum=2))
    micro = trainer._micro_batches()  # batches are cut on the host, from host data: not part of the device step
    trainer._micro_batches = lambda: micro
    as_on_gpu["n"], as_on_gpu["where"] = 0, []
    record = trainer.train_step()
    assert as_on_gpu["where"] == ["tolist"] and record["loss"] > 0 and record["grad_norm"] > 0


def test_read_back_is_exactly_float():
    vals = [torch.tensor(1 / 3), torch.tensor(2.5, dtype=torch.bfloat16), torch.tensor(1 / 7, dtype=torch.float64)]
    assert device.read_back(vals) == [float(v) for v in vals]


def test_sync_free_paths_compute_the_same(monkeypatch):
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("mixtral-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for name in USERS:
            import importlib

            monkeypatch.setattr(importlib.import_module(name), "host_reads_ok", lambda t: False)
        ours = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_decode_layout_is_only_applied_where_it_was_measured():
    from llmarch.infer.layout import decode_layout

    cpu, meta = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32, device="meta")
    assert decode_layout(cpu) == 1 and not cpu.weight.is_contiguous()
    assert decode_layout(meta) == 0 and meta.weight.is_contiguous()
