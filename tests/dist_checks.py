"""Run under torchrun (2 or 4 gloo processes) by tests/test_parallel_axes.py: each named check trains a tiny model a few
steps with one parallel axis and with one process (the reference, computed on every rank from the same seed),
and compares losses and gradients (fp32, 1e-5). Usage: torchrun ... tests/dist_checks.py CHECK [CHECK ...]."""
from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import llmarch
from llmarch.train.parallel import mesh as M
from llmarch.train.parallel.apply import clip_grad_norm
from llmarch.train.parallel.tensor import loss_context

TOL = 1e-5
STEPS = 3
LLAMA = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def batch(step: int, B: int = 4, T: int = 16, V: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reference(cfg, steps: int = STEPS):
    """Losses and per-step gradients of one process on the whole batch (Adam, fixed lr)."""
    torch.manual_seed(0)
    model = llmarch.build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, grads = [], []
    for s in range(steps):
        ids, labels = batch(s)
        out = model(ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()) + out.aux_loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, grads, model


def local_numel(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def check_plan(name, cfg, params, opt, rel: float = 0.0, **mesh) -> None:
    """``llmarch plan --mesh`` figures against this rank's measured parameters and Adam state (largest rank)."""
    from llmarch.analysis.parallel_plan import mesh_plan

    plan = mesh_plan(cfg, 16, 4, "fp32", **mesh)
    got = torch.tensor([sum(local_numel(p) for p in params),
                        sum(local_numel(v) * v.element_size() for st in opt.state.values() for v in st.values()
                            if torch.is_tensor(v) and v.dim() > 0)], dtype=torch.float64)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)
    for measured, planned in zip(got.tolist(), (plan["params"], plan["adamw"])):
        assert abs(measured - planned) <= rel * planned, f"{name}: plan {planned} vs measured {measured} ({mesh})"


def check_activations(name, cfg, model, rel: float = 0.02, **mesh) -> None:
    """``llmarch plan --mesh`` activations against the bytes autograd saves on this rank for one forward and the
    training loss on its rows (largest rank; the counts are exact per component, ``rel`` covers id storages)."""
    from llmarch.analysis.activations import measure_saved_bytes
    from llmarch.analysis.parallel_plan import mesh_plan
    from llmarch.train.objectives import ce_sum

    ids, labels = batch(0)
    rows = len(ids) // mesh.get("dp", 1)

    def step():
        with loss_context(model):
            ce_sum(model(ids[:rows]).logits, labels[:rows])

    got = torch.tensor(float(measure_saved_bytes(step, model.parameters())), dtype=torch.float64)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)
    planned = mesh_plan(cfg, ids.shape[1], rows, "fp32", **mesh)["activations"]
    assert abs(got.item() - planned) <= rel * got.item(), f"{name}: planned {planned} vs saved {got.item()} ({mesh})"


def compare(name, ref, losses, grads, natural=lambda n, t: t):
    ref_losses, ref_grads = ref[0], ref[1]
    worst = max(abs(a - b) for a, b in zip(ref_losses, losses))
    assert worst < TOL, f"{name}: losses differ by {worst}: {ref_losses} vs {losses}"
    for s, (rg, g) in enumerate(zip(ref_grads, grads)):
        assert rg.keys() == g.keys(), (name, sorted(set(rg) ^ set(g)))
        for n in rg:
            d = (rg[n] - natural(n, g[n])).abs().max().item()
            assert d < TOL, f"{name}: step {s} gradient of {n} differs by {d}"
    if dist.get_rank() == 0:
        print(f"{name}: ok (losses {[round(x, 5) for x in losses]})", flush=True)


@check
def tp():
    """Tensor parallel over all ranks: vocab-parallel embedding and loss, column/row attention and GLU."""
    tensor_parallel("tp", tp=dist.get_world_size())


def average_replicated(model) -> None:
    """Data-parallel gradient mean of the plain (replicated) parameters, as DDP does."""
    for p in model.parameters():
        if p.grad is not None and not hasattr(p.grad, "full_tensor"):
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


@check
def ep():
    """Expert parallel over all ranks, data parallel tokens, with a capacity limit that drops assignments."""
    from llmarch.train.parallel.expert import apply_expert_parallel

    cfg = llmarch.preset("mixtral-tiny", **LLAMA)
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, capacity_factor=1.0, balance_coef=0.0, dispatch="sliced"))
    ref = reference(cfg)
    world, rank = dist.get_world_size(), dist.get_rank()
    spec = M.spec_for(cfg, world, ep=world)
    mesh = M.build_mesh(spec)
    torch.manual_seed(0)
    model = llmarch.build(cfg)
    assert apply_expert_parallel(model, mesh["dp"]) == cfg.n_layers
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, grads, dropped = [], [], 0.0
    for s in range(STEPS):
        ids, labels = batch(s)
        rows = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
        out = model(ids[rows])
        loss = F.cross_entropy(out.logits.flatten(0, 1), labels[rows].flatten()) / world
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss)
        losses.append(loss.item())
        dropped += llmarch.nn.moe.moe_metrics(model)["moe_dropped_fraction"]
        for p in model.parameters():  # the DDP convention: each rank's loss times world, gradients averaged
            p.grad *= world
        average_replicated(model)
        grads.append({n: full(p.grad).clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    assert dropped > 0, "the capacity limit should drop some assignments"
    compare("ep", ref, losses, grads)
    check_plan("ep", cfg, model.parameters(), opt, dp=world, ep=world, fsdp=False)


@check
def pp():
    """Pipeline parallel: one stage of one layer per rank, 4 micro-batches under 1F1B (GPipe on the last step)."""
    from llmarch.train.parallel.pipeline import build_pipeline

    world = dist.get_world_size()
    cfg = llmarch.preset("llama-tiny", **dict(LLAMA, n_layers=max(2, world)))
    ref = reference(cfg)
    mesh = M.build_mesh(M.spec_for(cfg, world, pp=world))
    torch.manual_seed(0)
    model = llmarch.build(cfg)

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    stage, sched = build_pipeline(model, mesh["pp"], 4, loss_fn, "1f1b")
    _, gpipe = build_pipeline(model, mesh["pp"], 4, loss_fn, "gpipe")
    opt = torch.optim.Adam(stage.parameters(), lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    losses, grads = [], []
    for s in range(STEPS):
        ids, labels = batch(s)
        mb = []
        (gpipe if s == STEPS - 1 else sched).step(ids if stage.first else None,
                                                   target=labels if stage.last else None, losses=mb)
        loss = torch.tensor(sum(float(x) for x in mb) / 4 if stage.last else 0.0)
        dist.all_reduce(loss)
        losses.append(loss.item())
        grads.append({names[id(p)]: p.grad.clone() for p in stage.parameters()})
        opt.step()
        opt.zero_grad()
    assert len(grads[0]) < len(ref[1][0])
    ref = (ref[0], [{n: g[n] for n in mine} for g, mine in zip(ref[1], grads)])
    compare("pp", ref, losses, grads)
    check_plan("pp", cfg, stage.parameters(), opt, pp=world, fsdp=False)


def mesh_model(cfg, **degrees):
    """A model wrapped for the mesh of ``degrees`` as the trainer does (TP and/or FSDP2), and its Adam."""
    from types import SimpleNamespace

    from llmarch.train.distributed import DistEnv
    from llmarch.train.parallel.apply import parallelize

    env = DistEnv(dist.get_rank(), dist.get_world_size())
    torch.manual_seed(0)
    tc = SimpleNamespace(**{**dict(dp=None, tp=1, ep=1, pp=1, parallel="fsdp", seq_len=16), **degrees})
    model = parallelize(llmarch.build(cfg), cfg, env, tc)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), env


def train_steps(model, opt, env, steps, grads: list | None = None, norms: list | None = None) -> list[float]:
    """Steps of the global batch: each data-parallel rank its rows, the loss summed over the batch's targets."""
    out_losses = []
    for s in steps:
        ids, labels = batch(s)
        n = len(ids) // env.dp_world
        rows = slice(env.dp_rank * n, (env.dp_rank + 1) * n)
        with loss_context(model):
            logits = model(ids[rows]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels[rows].flatten(), reduction="sum") / labels.numel()
            (loss * env.dp_world).backward()
        copies = getattr(model, "kv_copies", None)  # as the trainer does: sum the gradients of kv copies
        if copies is not None:
            copies.sync(model)
            if norms is not None:
                norms.append(clip_grad_norm(model.parameters(), float("inf"), copies.row_weights()).item())
        loss = full(loss).detach().clone()
        if env.dp_world > 1:
            mesh = getattr(model, "parallel_mesh", None)  # over the data-parallel ranks only
            dist.all_reduce(loss, group=mesh["dp"].get_group() if mesh is not None else None)
        out_losses.append(loss.item())
        if grads is not None:
            grads.append({n: full(p.grad).clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return out_losses


def full_states(model, opt):
    from llmarch.train.distributed import full_state

    return full_state(model, opt)


def same(a: dict, b: dict, tol: float = 0.0) -> float:
    worst = 0.0
    for k, v in a.items():
        if torch.is_tensor(v):
            worst = max(worst, (v.float() - b[k].float()).abs().max().item())
        elif isinstance(v, dict):
            worst = max(worst, same(v, b[k]))
    return worst


@check
def dcp():
    """DCP: save sharded on tp=2 (x dp = world/2, FSDP2) at step 2; resume on the same mesh bit-equal to the
    uninterrupted run; resume on dp=world (FSDP2 only) with the same full state bit-for-bit and the same losses
    within 1e-5; export one safetensors dir."""
    import tempfile
    from pathlib import Path

    from llmarch.train.parallel import dcp as DCP

    cfg = llmarch.preset("llama-tiny", **LLAMA)
    world = dist.get_world_size()
    model, opt, env = mesh_model(cfg, tp=2)
    whole = train_steps(model, opt, env, range(4))
    final = full_states(model, opt)
    tmp = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp)
    ckpt = Path(tmp[0]) / "step2"
    model, opt, env = mesh_model(cfg, tp=2)
    first = train_steps(model, opt, env, range(2))
    saved = full_states(model, opt)
    DCP.save(model, opt, ckpt)
    DCP.export(model, opt, Path(tmp[0]) / "export")
    model, opt, env = mesh_model(cfg, tp=2)
    DCP.load(model, opt, ckpt)
    again = first + train_steps(model, opt, env, range(2, 4))
    assert again == whole, (again, whole)
    assert same(final[0], full_states(model, opt)[0]) == 0.0
    model, opt, env = mesh_model(cfg, dp=world)
    DCP.load(model, opt, ckpt)
    loaded = full_states(model, opt)
    if dist.get_rank() == 0:
        assert same(saved[0], loaded[0]) == 0.0 and same(saved[1]["state"], loaded[1]["state"]) == 0.0
        exported = llmarch.checkpoint.load_model(Path(tmp[0]) / "export").state_dict()
        assert same(saved[0], exported) == 0.0
    other = first + train_steps(model, opt, env, range(2, 4))
    worst = max(abs(a - b) for a, b in zip(other, whole))
    assert worst < TOL, (other, whole)
    if dist.get_rank() == 0:
        print(f"dcp: ok (resume on tp bit-equal, on fsdp within {worst:.1e})", flush=True)


def tensor_parallel(name: str, config: dict | None = None, **degrees):
    """Train with tensor parallel (+ FSDP2 over what the world leaves) and compare with one process (with kv
    copies, also the gradient norm the trainer clips with)."""
    cfg = llmarch.preset("llama-tiny", **{**LLAMA, **(config or {})})
    ref = reference(cfg)
    model, opt, env = mesh_model(cfg, **degrees)
    assert env.dp_world == dist.get_world_size() // degrees["tp"]
    grads, norms = [], []
    losses = train_steps(model, opt, env, range(STEPS), grads, norms)
    compare(name, ref, losses, grads, model.tp_layout.to_natural)
    want = [torch.stack([g.norm() for g in step.values()]).norm().item() for step in ref[1]]
    assert not norms or max(abs(a - b) for a, b in zip(norms, want)) < TOL, (name, norms, want)
    return cfg, model, opt, env


@check
def tp_kv_copies():
    """GQA with one kv head on tp = 2 (dp = world / 2, FSDP2): each rank holds a copy of it, their gradients are
    summed, the copies stay equal, and the clipped norm counts them once; a DCP round trip is exact."""
    cfg, model, opt, env = tensor_parallel("tp_kv_copies", config=dict(n_kv_heads=1), tp=2)
    check_plan("tp_kv_copies", cfg, model.parameters(), opt, rel=0.05 if env.dp_world > 1 else 0.0,
               dp=env.dp_world, tp=2, fsdp=env.dp_world > 1)
    qkv = full(model.decoder.layers[0].attn.qkv.weight)  # [q_0 k v | q_1 k v] rows, Dh = 8
    h = qkv.shape[0] // 2
    assert model.kv_copies is not None and torch.equal(qkv[h - 16:h], qkv[2 * h - 16:])
    round_trip("tp_kv_copies", cfg, model, opt, tp=2)


@check
def tp_tied():
    """Tensor parallel with the LM head tied to the embedding: one DTensor split over the vocabulary for both;
    the planner's per-rank parameters, AdamW state and saved activations equal the measured ones."""
    cfg, model, opt, env = tensor_parallel("tp_tied", tp=2, config=dict(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.tokens.weight
    check_plan("tp_tied", cfg, model.parameters(), opt, dp=env.dp_world, tp=2, fsdp=env.dp_world > 1)
    check_activations("tp_tied", cfg, model, dp=env.dp_world, tp=2)
    round_trip("tp_tied", cfg, model, opt, tp=2, config=dict(tie_embeddings=True))


def round_trip(name, cfg, model, opt, **degrees) -> None:
    """A sharded DCP save of ``model`` / ``opt`` read back into a fresh model on the same mesh: bit-equal."""
    import tempfile
    from pathlib import Path

    from llmarch.train.parallel import dcp as DCP

    degrees.pop("config", None)
    tmp = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp)
    DCP.save(model, opt, Path(tmp[0]) / "ckpt")
    fresh, fresh_opt, _ = mesh_model(cfg, **degrees)
    DCP.load(fresh, fresh_opt, Path(tmp[0]) / "ckpt")
    a, b = full_states(model, opt), full_states(fresh, fresh_opt)
    if dist.get_rank() == 0:
        assert same(a[0], b[0]) == 0.0 and same(a[1]["state"], b[1]["state"]) == 0.0, name


@check
def tp_fsdp():
    """2-D mesh: FSDP2 over dp = world/2 composed with tensor parallel over tp = 2."""
    cfg, model, opt, env = tensor_parallel("tp_fsdp", tp=2)
    # FSDP2 chunks dim 0 of each parameter: ranks differ by a few rows from the even split the plan assumes
    check_plan("tp_fsdp", cfg, model.parameters(), opt, rel=0.05, dp=env.dp_world, tp=2)


@check
def tp_sp():
    """Sequence parallel with TP x FSDP2: the residual stream split over T between the column/row pairs."""
    _, model, _, _ = tensor_parallel("tp_sp", tp=2, sequence_parallel=True)
    assert model(batch(0)[0][:1]).hidden_states.shape[1] == 16 // 2  # each rank keeps half of the sequence


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for name in sys.argv[1:]:
            CHECKS[name]()
    finally:
        dist.barrier()
        dist.destroy_process_group()
