"""The training loop on one process: loss falls, metrics, exact resume, checkpoint integrity, mixed precision and
activation checkpointing, settings validation, the CLI."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import llmarch
from llmarch.model import ModelOutput
from llmarch.train import Trainer, train
from llmarch.train import checkpoints as ckpt
from llmarch.train import loop
from llmarch.train.metrics import read_metrics
from llmarch.train.optim import WarmupCosine, keep_implementation, make_optimizer, param_groups
from tests.train_util import TINY, settings  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_decoder_loss_falls_and_metrics(tmp_path, cache):
    tc = settings(tmp_path / "run", cache, steps=30, eval_every=10, log_every=5, samples=1, sample_tokens=8)
    result = train(TINY, tc)
    vals = [v for _, v in result.val_losses]
    assert len(vals) == 3 and vals[0] > vals[1] > vals[2] and vals[0] - vals[2] > 0.3, vals
    assert result.config.vocab_size == 400 and result.config.eos_token_id == 2  # taken from the tokenizer
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
        assert ("val_loss" in r) == (r["step"] % 10 == 0)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert len(result.samples) == 1 and result.samples[0][0]
    assert ckpt.list_checkpoints(tmp_path / "run") == [result.checkpoint]


def test_schedule_and_param_groups():
    model = llmarch.build(TINY.replace(tie_embeddings=True, qkv_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight", "bias"}
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())  # the tied head counted once
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    s = WarmupCosine(opt, peak=1.0, warmup=4, total=14, min_ratio=0.1)
    lrs = [s.lr_at(i) for i in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert abs(lrs[9] - 0.55) < 1e-12 and lrs[14] == lrs[15] == pytest.approx(0.1)


def test_the_optimizer_is_fused_and_updates_as_the_per_tensor_loop():
    """make_optimizer runs torch's fused AdamW on CPU parameters: the same update as the per-tensor loop (three
    steps, two groups, weight decay on one), up to the rounding of the order of its operations."""
    torch.manual_seed(0)
    models = [llmarch.build(TINY) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], lr=1e-2, weight_decay=0.1)
    loop_ = torch.optim.AdamW(param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-5)
    assert fused.defaults["fused"] is True and not loop_.defaults["fused"]
    before = [p.detach().clone() for p in models[0].parameters()]
    for step in range(3):
        for m, opt in zip(models, (fused, loop_)):
            for i, p in enumerate(m.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
    for a, b, start in zip(*(m.parameters() for m in models), before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - start).abs().max() > 1e-3  # three steps of lr 1e-2 moved every weight


def test_a_loaded_optimizer_state_keeps_the_fused_update():
    """A state saved by the per-tensor loop (an earlier llmarch's checkpoint) names it in its groups; once loaded,
    keep_implementation runs the fused update again."""
    model = llmarch.build(TINY)
    old = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    opt = make_optimizer(model, lr=1e-3)
    opt.load_state_dict(old.state_dict())
    assert not any(g["fused"] for g in opt.param_groups)
    keep_implementation(opt)
    assert all(g["fused"] for g in opt.param_groups)


def test_kill_and_resume_is_bit_identical(tmp_path, cache, monkeypatch):
    cfg = TINY.replace(dropout=0.1)  # dropout makes the RNG state matter
    full = train(cfg, settings(tmp_path / "full", cache, steps=8, save_every=4))
    original = Trainer.train_step

    def killed_at_6(self):
        if self.step == 6:
            raise KeyboardInterrupt("killed")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, settings(tmp_path / "cut", cache, steps=8, save_every=4))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["step_00000004"]
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 7))
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = train(cfg, settings(tmp_path / "cut", cache, steps=8, save_every=4, resume=True))
    assert resumed.step == 8
    a, b = (read_metrics(tmp_path / d) for d in ("full", "cut"))
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    for name in ("model.safetensors", "optimizer.pt", "rng.safetensors"):
        assert (full.checkpoint / name).read_bytes() == (resumed.checkpoint / name).read_bytes(), name


def test_corrupt_checkpoint_is_refused(tmp_path, cache, caplog):
    run = tmp_path / "run"
    train(TINY, settings(run, cache, steps=6, save_every=2, keep_last=2))
    kept = ckpt.list_checkpoints(run)
    assert [p.name for p in kept] == ["step_00000004", "step_00000006"]  # keep-last-k
    newest = kept[-1] / "model.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-5] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="corrupt: model.safetensors does not match its sha256"):
        ckpt.verify(kept[-1])
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_good(run) == kept[0]
    assert "using an earlier checkpoint" in caplog.text
    resumed = Trainer(TINY, settings(run, cache, steps=6, save_every=2, keep_last=2, resume=True))
    assert resumed.step == 4  # continued from the previous good checkpoint
    (kept[0] / "manifest.json").unlink()  # an interrupted save
    with pytest.raises(ckpt.CheckpointError, match="incomplete.*no manifest.json"):
        ckpt.verify(kept[0])
    with pytest.raises(ValueError, match="no usable checkpoint"):
        Trainer(TINY, settings(run, cache, steps=6, resume=True))
    with pytest.raises(ValueError, match="already has checkpoints; pass --resume"):
        Trainer(TINY, settings(run, cache, steps=6))


def test_bf16_and_activation_checkpointing_match_fp32(tmp_path, cache):
    def losses(name, **kw):
        train(TINY, settings(tmp_path / name, cache, steps=3, eval_every=3, **kw))
        return [r["loss"] for r in read_metrics(tmp_path / name)] + [read_metrics(tmp_path / name)[-1]["val_loss"]]

    fp32 = losses("fp32")
    ac = losses("ac", grad_checkpointing=True)
    bf16 = losses("bf16", precision="bf16")
    fp16 = losses("fp16", precision="fp16")
    assert max(abs(a - b) for a, b in zip(fp32, ac)) < 1e-5, (fp32, ac)  # recomputation is exact up to fp32
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 3e-2, (fp32, bf16)  # bf16 keeps 8 mantissa bits
    assert max(abs(a - b) for a, b in zip(fp32, fp16)) < 1e-2, (fp32, fp16)
    assert fp32 != bf16  # autocast really ran in bf16


def test_activation_checkpointing_recomputes(tmp_path):
    from llmarch.train.optim import enable_activation_checkpointing

    torch.manual_seed(0)
    model = llmarch.build(TINY)
    ref = llmarch.build(TINY)
    ref.load_state_dict(model.state_dict())
    assert enable_activation_checkpointing(model) == TINY.n_layers
    assert list(model.state_dict()) == list(ref.state_dict())  # names unchanged
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    calls = []
    model.decoder.layers[0].ffn.register_forward_pre_hook(lambda *a: calls.append(1))
    model(ids).logits.square().mean().backward()
    ref(ids).logits.square().mean().backward()
    assert len(calls) == 2  # forward, then again in backward
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_moe_aux_loss_is_added(tmp_path, cache, monkeypatch):
    class WithAux(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.config, self.inner = cfg, llmarch.build(cfg)

        def forward(self, input_ids):
            out = self.inner(input_ids)
            aux = 0.01 * self.inner.embed.tokens.weight.square().sum()
            return ModelOutput(out.logits, out.hidden_states, aux)

    monkeypatch.setattr(loop, "build", WithAux)
    train(TINY, settings(tmp_path / "run", cache, steps=2))
    records = read_metrics(tmp_path / "run")
    assert all(r["aux_loss"] > 0 for r in records)


def test_settings_are_validated(tmp_path, cache):
    with pytest.raises(ValueError, match="steps: must be a positive integer"):
        settings(tmp_path, cache, steps=0)
    with pytest.raises(ValueError, match="precision"):
        settings(tmp_path, cache, precision="fp8")
    with pytest.raises(ValueError, match="seq_len: 128 is longer than the model's max_seq_len 64"):
        Trainer(TINY, settings(tmp_path / "a", cache, seq_len=128))
    train(TINY, settings(tmp_path / "b", cache, steps=2))
    with pytest.raises(ValueError, match=r"settings \['lr'\] differ"):
        Trainer(TINY, settings(tmp_path / "b", cache, steps=4, lr=1e-2, resume=True))
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(TINY.replace(d_ff=96), settings(tmp_path / "b", cache, steps=4, resume=True))
    s = settings(tmp_path, cache, seq_len=64, curriculum_start=16, curriculum_steps=4)
    assert [s.seq_len_at(i) for i in range(6)] == [16, 24, 40, 48, 64, 64]


def test_cli_train_then_generate(tmp_path, cache, capsys):
    from llmarch.cli import main

    run = tmp_path / "run"
    argv = ["train", "--preset", "llama-tiny", "--set", "d_model=32", "--set", "n_layers=1", "--set", "d_ff=64",
            "--out", str(run), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--max-data-mb", "0.2",
            "--vocab-size", "400", "--cache-dir", str(cache), "--eval-every", "3", "--samples", "1",
            "--sample-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained to step 3" in out and "--- sample ---" in out
    assert json.loads((run / "train.json").read_text())["steps"] == 3
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(argv[:-1] + ["--precision", "fp8"]) == 2
    assert "precision" in capsys.readouterr().err
    assert not math.isnan(read_metrics(run)[-1]["loss"])


def test_nproc_relaunch_keeps_every_argument():
    from llmarch.cli import build_parser
    from llmarch.cli.train import argv_from_args, train_config_from_args

    argv = ["train", "--preset", "llama-tiny", "--set", "d_model=32", "--out", "runs/x", "--steps", "7", "--nproc",
            "2", "--parallel", "fsdp", "--grad-checkpointing", "--no-progress", "--lr", "0.001", "--max-data-mb", "1.5"]
    args = build_parser().parse_args(argv)
    rank_args = build_parser().parse_args(["train"] + argv_from_args(args))
    assert "--nproc" not in argv_from_args(args) and rank_args.set == ["d_model=32"]
    assert train_config_from_args(rank_args) == train_config_from_args(args)
    tc = train_config_from_args(args)
    assert (tc.steps, tc.parallel, tc.grad_checkpointing, tc.progress, tc.lr) == (7, "fsdp", True, False, 1e-3)
