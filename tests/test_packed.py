"""Packed inference weights (llmarch.nn.dense.pack, llmarch.infer.layout.pack_weights): the packed products equal
F.linear, are used only while the weight is unchanged and only where no gradient is needed, and decoding with
them gives the tokens decoding without them gives. Every test runs with oneDNN's packed copies and, where it
builds, with the native kernel's blocked copies of fp32 matrices."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmarch
from llmarch.infer import layout
from llmarch.nn import dense

pytestmark = pytest.mark.skipif(not dense.ONEDNN, reason="this torch build has no oneDNN")


@pytest.fixture(params=["native", "onednn"], autouse=True)
def copies(request, monkeypatch):
    """Each test twice: with llmarch's native fp32 kernel, whose blocked copies :func:`dense.pack` then keeps for
    2-D fp32 weights (skipped where it cannot be built), and with oneDNN's packed copies for every weight."""
    if request.param == "native" and not dense.native_fp32.available():
        pytest.skip("no AVX-512 / AVX2 CPU or no C compiler: the native kernel cannot be built here")
    if request.param == "onednn":
        monkeypatch.setattr(dense.native_fp32, "available", lambda: False)
    return request.param


def fp32_route(rows: int) -> str:
    """Where an fp32 inference product over a packed 2-D weight runs."""
    if not dense.native_fp32.available():
        return "packed"
    return "native" if rows <= dense.native_fp32.MAX_ROWS else "plain"


class PackedCalls(TorchDispatchMode):
    """Counts the oneDNN products whose weight is a packed (oneDNN-layout) tensor, the other oneDNN / BLAS
    products (plain) and the products of llmarch's native kernel over a blocked copy (native)."""

    def __init__(self):
        super().__init__()
        self.packed = self.plain = self.native = 0

    def __enter__(self):
        self._mm, self._mm16 = dense.native_fp32.mm, dense.native_bf16.mm
        dense.native_fp32.mm = lambda *a: setattr(self, "native", self.native + 1) or self._mm(*a)
        dense.native_bf16.mm = lambda *a: setattr(self, "native", self.native + 1) or self._mm16(*a)
        return super().__enter__()

    def __exit__(self, *exc):
        dense.native_fp32.mm, dense.native_bf16.mm = self._mm, self._mm16
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "mkldnn._linear_pointwise" in str(func) or "mm" in str(func) or "addmm" in str(func):
            w = args[1]
            if w.layout == torch._mkldnn:
                self.packed += 1
            else:
                self.plain += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 8, 130])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout_", ["row", "col"])
def test_packed_product_equals_f_linear(rows, bias, layout_):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    w = w if layout_ == "row" else w.t().contiguous().t()  # the decode layout of wide weights
    b = torch.randn(48, generator=g) if bias else None
    x = torch.randn(rows, 40, generator=g)
    assert dense.pack(w) and not dense.pack(w)  # made once
    with PackedCalls() as calls, torch.no_grad():
        y = dense.linear(x[:, None], w, b)  # [rows, 1, 40]: any leading shape
    route = fp32_route(rows)
    assert (calls.packed, calls.native, calls.plain) == (route == "packed", route == "native", route == "plain")
    torch.testing.assert_close(y[:, 0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 5, 8, 9, 130])
def test_packed_bf16_product_equals_f_linear(rows):
    """bf16 weights get the native kernel's blocked copies where it builds and the native bf16 decode layers can
    read them (dense.native_bf16_copies): on a CPU without oneDNN's bf16 products (no AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT) up to MAX_ROWS rows run there, more widened to fp32 over the plain weight (llmarch.nn.widened);
    on a CPU with them up to ONEDNN_HOST_BF16_ROWS rows, more on oneDNN over the plain weight. Values equal torch's
    bf16 product up to summation order (one bf16 rounding). Without the native kernel, a CPU with oneDNN's bf16
    products gets its packed copies (bit for bit)."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    x = torch.randn(rows, 40, generator=g).bfloat16()
    assert dense.pack(w) == dense.packs_dtype(torch.bfloat16)
    with PackedCalls() as calls, torch.no_grad():
        y = dense.linear(x, w, b)
    if dense.ONEDNN_BF16 and not dense.native_bf16_copies():
        assert calls.packed == 1 and torch.equal(y, F.linear(x, w, b))
        return
    native = dense.native_bf16_copies() and rows <= dense.native_max_rows(torch.bfloat16)
    assert calls.packed == 0 and calls.native == native
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=2 ** -7, atol=1e-5)


def test_a_stale_packed_copy_is_never_used():
    """In-place updates, swapped storage and a new tensor all fall back to the current values."""
    g = torch.Generator().manual_seed(0)
    lin = dense.Linear(32, 24)
    x = torch.randn(2, 32, generator=g)
    dense.pack(lin.weight)
    with torch.no_grad():
        lin.weight.add_(1.0)  # an optimizer step
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        dense.pack(lin.weight)
        lin.weight.data = torch.randn(24, 32, generator=g)  # same Parameter, new storage
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        dense.pack(lin.weight)
        lin.load_state_dict({"weight": torch.zeros(24, 32), "bias": lin.bias.clone()})
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert dense.packed(lin.weight) is None


def test_a_copy_of_another_dtype_or_shape_at_the_same_storage_is_stale():
    """``model.to(torch.bfloat16)`` keeps each Parameter and its version, and its new storage can land where a freed
    one was: a copy is only current for the dtype and shape it was made from (the bf16 decode layers once met an
    expert bank whose fp32 copy looked current after the conversion, and stood aside)."""
    bank = torch.nn.Parameter(torch.randn(4, 16, 24))
    dense.pack(bank)
    assert dense.packed(bank) is not None
    version, pointer = bank._version, bank.data_ptr()
    with torch.no_grad():
        bank.data = bank.data.view(torch.bfloat16)  # the same storage and version, read as bf16 [4, 16, 48]
    assert bank.data_ptr() == pointer and bank._version == version
    assert dense.packed(bank) is None
    assert dense.pack(bank) and dense.packed(bank) is not None


def test_gradients_and_autocast_take_the_plain_path():
    lin = dense.Linear(16, 8)
    dense.pack(lin.weight)
    x = torch.randn(3, 16)
    with PackedCalls() as calls:
        lin(x).sum().backward()  # a gradient is needed: the packed copy cannot give one
    assert calls.packed == calls.native == 0 and lin.weight.grad is not None
    with PackedCalls() as calls, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    assert calls.packed == calls.native == 0
    with PackedCalls() as calls, torch.no_grad():
        lin(x)
    assert calls.packed + calls.native == 1  # the copy is still there, and used
    dense.unpack(lin.weight)
    with PackedCalls() as calls, torch.no_grad():
        lin(torch.randn(8, 16))
    assert calls.packed == calls.native == 0


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_generation_with_packed_weights_equals_without(preset):
    """generate() packs once (the tied head too), every projection and the head then run packed, and the greedy
    tokens and the logits equal the unpacked model's."""
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset(preset).replace(n_layers=2)).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        ref_logits = model(ids).logits
    ref = llmarch.generate(model, ids, max_new_tokens=6)  # 18 tokens: too few to repay packing
    assert all(dense.packed(m.weight) is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(llmarch.generate(model, ids, max_new_tokens=6), ref)  # unchanged weights: packs
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(dense.packed(m.weight) is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert layout.pack_weights(model) == 0  # already packed: nothing to do
    with PackedCalls() as calls, torch.no_grad():
        logits = model(ids).logits
    route = fp32_route(ids.numel())
    assert getattr(calls, route) == n_linear and calls.packed + calls.native + calls.plain == n_linear
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    layout.unpack_weights(model)
    assert all(dense.packed(m.weight) is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    with PackedCalls() as calls, torch.no_grad():
        model(ids)
    assert calls.packed == calls.native == 0
    assert torch.equal(llmarch.generate(model, ids, max_new_tokens=6), ref)


def test_packing_is_skipped_when_it_would_not_fit(monkeypatch):
    model = llmarch.build(llmarch.preset("llama-tiny").replace(n_layers=1))
    weight_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(layout, "_free_bytes", lambda: weight_bytes)  # a copy would take over half of it
    assert layout.pack_weights(model) == 0
    monkeypatch.setattr(layout, "_free_bytes", lambda: 4 * weight_bytes)
    assert layout.pack_weights(model) > 0
    layout.unpack_weights(model)


@pytest.mark.parametrize("expert_ffn", ["glu", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40, 600])
def test_packed_experts_equal_the_grouped_products(expert_ffn, dtype, tokens):
    """An MoE layer whose banks are packed runs every expert product on the packed copies and gives the output of
    the grouped dispatcher over the plain bank (bf16 on oneDNN's copies: bit for bit; else rounding order aside).
    With native copies (fp32; bf16 where ``dense.native_bf16_copies``): an expert's products of up to
    ``dense.native_max_rows`` rows run on them, more rows over the plain bank."""
    from llmarch import MoEConfig
    from llmarch.nn.moe import MoE

    torch.manual_seed(0)
    moe = MoE(32, 48, "silu", moe=MoEConfig(n_experts=6, top_k=2, expert_ffn=expert_ffn))
    grouped = MoE(32, 48, "silu", moe=MoEConfig(n_experts=6, top_k=2, expert_ffn=expert_ffn, dispatch="grouped"))
    grouped.load_state_dict(moe.state_dict())
    moe, grouped = moe.to(dtype).eval(), grouped.to(dtype).eval()
    x = torch.randn(1, tokens, 32).to(dtype)
    banks = dense.packs_dtype(dtype)  # else bf16 banks stay unpacked
    assert layout.pack_weights(moe) == (3 if banks else 0)  # two banks and the router's matrix
    routed = []
    dispatch = moe.dispatch
    moe.dispatch = lambda flat, experts, *a: routed.append(experts) or dispatch(flat, experts, *a)
    with torch.no_grad():
        ref = grouped(x)
        with PackedCalls() as calls:
            y = moe(x)
    rows = torch.bincount(routed[0].flatten(), minlength=6).tolist()  # per expert
    native = fp32_route(1) == "native" if dtype == torch.float32 else dense.native_bf16_copies()
    if banks and native:
        limit = dense.native_max_rows(dtype)
        few = sum(0 < r <= limit for r in rows)
        assert calls.packed == 0 and calls.native == 2 * few  # two matrices per expert
        assert calls.plain == 1 + 2 * sum(r > limit for r in rows)  # and the router's
        assert calls.plain > 1 if tokens == 600 else tokens > 1 or calls.plain == 1  # both regimes exercised
    elif banks:
        assert calls.packed == 2 * sum(r > 0 for r in rows) and calls.plain == 1  # the router's stays plain
    else:
        assert calls.packed == 0
    if dtype == torch.bfloat16 and dense.ONEDNN_BF16 and not native:  # oneDNN's packed copies
        assert torch.equal(y, ref)
    elif dtype == torch.bfloat16:
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        moe.experts.down.mul_(2.0)  # stale now: the plain bank runs
        grouped.experts.down.mul_(2.0)
        torch.testing.assert_close(moe(x).float(), grouped(x).float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if dtype != torch.float32 else 1e-5)
    x.requires_grad_(True)
    layout.pack_weights(moe)
    with PackedCalls() as calls:
        moe(x).float().sum().backward()  # training: no packed copies
    assert calls.packed == 0 and moe.experts.down.grad is not None


def test_moe_generation_with_packed_experts_equals_without():
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("mixtral-tiny").replace(n_layers=2)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        ref_logits = model(ids).logits
    out = llmarch.generate(model, ids, max_new_tokens=5)
    assert torch.equal(llmarch.generate(model, ids, max_new_tokens=5), out)  # unchanged weights: packs, experts too
    assert all(dense.packed(m.experts.down) is not None for m in model.modules() if hasattr(m, "experts"))
    with PackedCalls() as calls, torch.no_grad():
        logits = model(ids).logits
    # only the two routers run plain (fp32 routing); over blocked copies the MoE forward is one native call
    # (llmarch.nn.fused_moe), routing included
    blocked = isinstance(dense.packed(model.decoder.layers[0].ffn.experts.down)[0], dense.native_fp32.Blocked)
    routers = 0 if blocked else 2
    assert calls.packed + calls.native > 0 and calls.plain == routers
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    layout.unpack_weights(model)
    assert torch.equal(llmarch.generate(model, ids, max_new_tokens=5), out)


def test_unmerged_lora_on_experts_is_not_bypassed_by_the_packed_bank():
    """A LoRA-adapted bank reads W + update: inference must not run the packed copy of the bare W."""
    from llmarch import lora

    torch.manual_seed(0)
    cfg = llmarch.preset("mixtral-tiny").replace(vocab_size=97, n_layers=1, max_seq_len=64)
    model = llmarch.build(cfg).eval()
    lora.apply(model, r=2, alpha=4, targets=("experts.up", "experts.down"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # a non-zero update
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    layout.pack_weights(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    layout.unpack_weights(model)


def test_generate_packs_only_where_it_pays_back():
    """Short generations on weights that change between calls (a train-then-sample loop) never pack; unchanged
    weights pack on the next call; a long call packs at once."""
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(n_layers=1)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    head = model.lm_head.weight

    for _ in range(3):
        llmarch.generate(model, ids, max_new_tokens=4)
        assert dense.packed(head) is None
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.001)  # an optimizer step between the samples
    llmarch.generate(model, ids, max_new_tokens=4)
    assert dense.packed(head) is None
    llmarch.generate(model, ids, max_new_tokens=4)  # nothing changed since the last call
    assert dense.packed(head) is not None
    with torch.no_grad():
        head.add_(0.01)
    assert dense.packed(head) is None  # stale
    llmarch.generate(model, ids, max_new_tokens=layout.PACK_MIN_TOKENS // 2)  # 2 rows: enough tokens to repay it
    assert dense.packed(head) is not None
    layout.unpack_weights(model)


def test_compiled_decoding_reads_the_packed_copies(monkeypatch):
    """A compiled static-cache step reaches the packed copies through the opaque ``llmarch::packed_linear``: the
    same tokens as eager decoding, and the copies (native or oneDNN) serve the compiled steps' products."""
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("llama-tiny").replace(n_layers=2, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    want = llmarch.generate(model, ids, max_new_tokens=12)
    layout.pack_weights(model)
    uses = []
    real_native, real_mm = dense.native_fp32.mm, dense._mm
    monkeypatch.setattr(dense.native_fp32, "mm", lambda *a: uses.append(1) or real_native(*a))
    monkeypatch.setattr(dense, "_mm", lambda x, w, b: (uses.append(1) if w.layout == torch._mkldnn else None)
                        or real_mm(x, w, b))
    got = llmarch.generate(model, ids, max_new_tokens=12, cache="static", compile=True)
    assert torch.equal(got, want)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(uses) >= 11 * n_linear  # every product of every compiled decode step
    layout.unpack_weights(model)
