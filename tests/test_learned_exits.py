"""Learned early exits (seed 002's AdaptiveLLM): intermediate predictions through the shared head, one exit gate
per layer, the intermediate-loss objective written out, and the `learned` criterion at its extremes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import llmarch
from llmarch.infer.early_exit import early_exit_nll
from llmarch.train.objectives import objective_for
from tests.train_util import TINY, settings

CFG = llmarch.preset("llama-tiny").replace(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=3,
                                           exit_heads=True)


def test_exit_outputs_are_each_layers_prediction_through_the_shared_head():
    torch.manual_seed(0)
    model = llmarch.build(CFG).eval()
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids, output_exits=True)
    torch.testing.assert_close(out.logits, model(ids).logits)
    pos = torch.arange(6).expand(2, 6)
    from llmarch.nn.attention import AttnContext

    ctx = AttnContext(0, 6, model.decoder.positions, pos, None, causal=True, device=ids.device)
    h = model.embed(ids, model.decoder.positions, pos)
    for i, layer in enumerate(model.decoder.layers[:-1]):  # naive: run the blocks by hand
        h = layer(h, ctx, None)
        torch.testing.assert_close(out.exit_logits[i], model.lm_head(model.decoder.final_norm(h)))
        gate = model.exit_gates.gates[i]
        torch.testing.assert_close(out.exit_confidence[i], torch.sigmoid(h @ gate.weight[0] + gate.bias[0]))
    assert len(out.exit_logits) == CFG.n_layers - 1
    with pytest.raises(ValueError, match="exit_heads"):
        llmarch.build(CFG.replace(exit_heads=False))(ids, output_exits=True)


def test_exit_objective_is_the_written_out_sum():
    torch.manual_seed(0)
    model = llmarch.build(CFG)

    class Tok:  # the objective needs no tokenizer for causal LM
        pass

    obj = objective_for("causal_lm_exits", CFG, Tok())
    batch = obj.make_batch(torch.randint(0, 97, (2, 9)), torch.Generator())
    out = model(**batch.inputs, **obj.model_options)
    sums = obj.loss_sums(out, batch)
    y = batch.labels["lm"]
    final = out.logits.argmax(-1)
    exit_lm = torch.stack([F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="sum")
                           for lg in out.exit_logits]).mean()
    gate = torch.stack([F.binary_cross_entropy(c, (lg.argmax(-1) == final).float(), reduction="sum")
                        for lg, c in zip(out.exit_logits, out.exit_confidence)]).mean()
    torch.testing.assert_close(sums["exit_lm"], exit_lm)
    torch.testing.assert_close(sums["exit_gate"], gate)
    assert batch.counts == {"lm": y.numel(), "exit_lm": y.numel(), "exit_gate": y.numel()}
    sum(sums.values()).backward()
    assert all(g.weight.grad is not None for g in model.exit_gates.gates)


def test_learned_criterion_extremes():
    torch.manual_seed(0)
    model = llmarch.build(CFG).eval()
    ids = torch.randint(0, 97, (1, 12))
    full = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).item()
    with torch.no_grad():
        for g in model.exit_gates.gates:
            g.bias.fill_(-30.0)  # never confident: the full model
    nll, stats = early_exit_nll(model, ids, threshold=0.5, criterion="learned")
    assert abs(nll - full) < 1e-5 and set(stats.layers) == {CFG.n_layers}
    with torch.no_grad():
        for g in model.exit_gates.gates:
            g.bias.fill_(30.0)  # always confident: exit after the first layer
    _, stats = early_exit_nll(model, ids, threshold=0.5, criterion="learned")
    assert set(stats.layers) == {1}
    with pytest.raises(ValueError, match="exit_heads"):
        early_exit_nll(llmarch.build(CFG.replace(exit_heads=False)), ids, 0.5, criterion="learned")


def test_training_with_exit_losses_logs_each_term(tmp_path):
    result = llmarch.train.train(TINY.replace(exit_heads=True), settings(tmp_path / "run", tmp_path / "cache",
                                                                          steps=2, objective="causal_lm_exits"))
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"loss_lm", "loss_exit_lm", "loss_exit_gate"} <= set(rec)
    assert result.step == 2
