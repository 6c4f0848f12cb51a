"""Parameter and FLOP accounting held to the built model: sum(numel) on the meta device for every preset, and
torch's FlopCounterMode on a real forward."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import llmarch
from llmarch import presets
from llmarch.analysis import count_params, forward_flops, gpt_closed_form_flops, gpt_closed_form_params
from llmarch.analysis.flops import ffn_macs_per_token
from llmarch.analysis.params import closed_form_comparison
from llmarch.moe_config import MoEConfig
from llmarch.nn.ffn import GLU

GPT_STYLE = dict(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, d_ff=256, ffn="mlp", activation="gelu_tanh",
                 norm="layernorm", norm_bias=True, qkv_bias=True, out_bias=True, ffn_bias=True, position="none",
                 tie_embeddings=True, final_norm=False, max_seq_len=128)


@pytest.mark.parametrize("name", presets.names())
def test_param_count_equals_meta_model(name):
    cfg = presets.get(name)
    model = llmarch.build(cfg, device="meta")
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_components_match_module_groups():
    cfg = presets.get("qwen2-tiny")  # GQA, qkv biases, tied head
    model = llmarch.build(cfg, device="meta")
    comp = count_params(cfg).components
    by_name = {}
    for n, p in model.named_parameters():
        by_name[n] = p.numel()
    qkv = sum(v for n, v in by_name.items() if ".attn.qkv." in n)
    assert comp["attn_q"] + comp["attn_k"] + comp["attn_v"] == qkv
    assert comp["attn_o"] == sum(v for n, v in by_name.items() if ".attn.out." in n)
    assert comp["ffn"] == sum(v for n, v in by_name.items() if ".ffn." in n)
    assert comp["norms"] == sum(v for n, v in by_name.items() if "_norm." in n and ".layers." in n)
    assert comp["head"] == 0 and comp["embeddings"] == by_name["embed.tokens.weight"]


def test_closed_forms_equal_exact_for_gpt_style_config():
    cfg = llmarch.ModelConfig(**GPT_STYLE)
    assert gpt_closed_form_params(cfg) == count_params(cfg).total
    assert gpt_closed_form_params(cfg) == sum(p.numel() for p in llmarch.build(cfg, device="meta").parameters())
    assert all(row["delta"] == 0 for row in closed_form_comparison(cfg))
    for b, s in [(1, 32), (3, 17)]:
        assert gpt_closed_form_flops(cfg, s, b) == forward_flops(cfg, s, b).forward
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    assert gpt_closed_form_flops(cfg, 24, 2) == _counted(cfg.replace(attn_kernel="naive"), ids)


def test_closed_form_differences_are_explained_for_gpt2():
    cfg = presets.get("gpt2")
    rows = {r["term"]: r for r in closed_form_comparison(cfg)}
    exact = count_params(cfg).total
    assert exact - gpt_closed_form_params(cfg) == sum(r["delta"] for r in rows.values())
    assert rows["positions"]["delta"] == 1024 * 768 and "learned" in rows["positions"]["reason"]
    assert rows["embedding / final norms"]["delta"] == 2 * 768


def _counted(cfg, ids):
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    return counter.get_total_flops()


CASES = {
    "dense-mha-mlp": ("gpt2-tiny", {}),
    "gqa": ("llama-tiny", dict(ffn="mlp", activation="gelu")),
    "glu": ("llama-tiny", dict(n_kv_heads=None)),
    "gqa-glu-sliding": ("mistral-tiny", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_analytic_flops_equal_flop_counter(case):
    name, overrides = CASES[case]
    cfg = presets.get(name, **overrides)
    B, T = 2, 40
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    f = forward_flops(cfg, T, B)
    # the readable kernel does q·kᵀ and probs·v as counted matmuls over the whole T×S matrix
    assert _counted(cfg.replace(attn_kernel="naive"), ids) == f.forward
    # torch's counter has no formula for the fused CPU SDPA op: only the linear layers and the head are counted
    if not torch.cuda.is_available():
        assert _counted(cfg.replace(attn_kernel="sdpa"), ids) == f.linear + f.head


class _TopKMoE(nn.Module):
    """A dropless top-k MoE written out: each expert runs only on the tokens routed to it."""

    def __init__(self, D, F, E, K):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(GLU(D, F, "silu") for _ in range(E))
        self.k = K

    def forward(self, x):  # [N, D]
        top = self.router(x).topk(self.k, dim=-1).indices  # [N, K]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (top == e).any(-1).nonzero().squeeze(-1)
            if rows.numel():
                out[rows] += expert(x[rows])
        return out


def test_moe_accounting_matches_a_written_out_moe_layer():
    base = presets.get("llama-tiny")
    D, F, E, K = base.d_model, 96, 6, 2
    cfg = base.replace(ffn="moe", moe=MoEConfig(n_experts=E, top_k=K, d_ff=F))
    layer = _TopKMoE(D, F, E, K)
    x = torch.randn(50, D)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    assert counter.get_total_flops() == 2 * 50 * ffn_macs_per_token(cfg, 0)
    pc = count_params(cfg)
    per_layer = sum(p.numel() for p in layer.parameters())
    assert pc.components["router"] + pc.components["experts"] == base.n_layers * per_layer
    expert = sum(p.numel() for p in layer.experts[0].parameters())
    assert pc.total - pc.active == base.n_layers * (E - K) * expert


@pytest.mark.parametrize("dispatch", ["sliced", "loop", "grouped"])
def test_analytic_flops_equal_flop_counter_moe_model(dispatch):
    """Router + the K experts each token visits: the plain matmuls of the sliced and loop dispatchers count
    exactly that. FlopCounterMode has no formula for ``torch._grouped_mm`` (the grouped dispatcher, which ``auto``
    picks for small CPU batches), so there it sees no expert FLOPs at all."""
    cfg = presets.get("mixtral-tiny").replace(attn_kernel="naive")
    cfg = cfg.replace(moe=dict(dispatch=dispatch))
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    f = forward_flops(cfg, 40, 2)
    experts = 2 * 2 * 40 * cfg.n_layers * cfg.moe.top_k * 3 * cfg.d_model * cfg.moe.expert_d_ff(cfg.d_ff)
    assert _counted(cfg, ids) == f.forward - (experts if dispatch == "grouped" else 0)


def test_moe_active_params_and_schedule():
    cfg = presets.get("qwen2-moe-tiny")  # shared expert with a sigmoid gate
    m, D = cfg.moe, cfg.d_model
    pc = count_params(cfg)
    expert = 3 * D * m.expert_d_ff(cfg.d_ff)
    assert pc.total - pc.active == cfg.n_layers * (m.n_experts - m.top_k) * expert
    assert pc.components["shared_experts"] == cfg.n_layers * (3 * D * m.n_shared * m.shared_d_ff + D)
    # every other layer MoE, the first one dense: the dense layers are FFNs of the experts' kind and d_ff
    sched = cfg.replace(n_layers=4, moe=dict(every=2, offset=1, router_bias=True))
    model = llmarch.build(sched, device="meta")
    comp = count_params(sched).components
    assert comp["ffn"] == sum(p.numel() for n, p in model.named_parameters() if ".ffn." in n and "layers.0." in n) * 2
    assert comp["router"] == 2 * (D * m.n_experts + m.n_experts)


MIXED = {
    # multi-head latent attention with a q latent, naive path (no cache), DeepSeekMoE FFNs; the experts run
    # sliced because FlopCounterMode has no formula for torch._grouped_mm
    "mla": ("deepseek-v2-tiny", dict(moe=dict(dispatch="sliced"))),
    "mla-no-q-latent": ("deepseek-v2-tiny", dict(mla=dict(q_lora_rank=None), moe=dict(dispatch="sliced"))),
    # encoder + decoder + cross-attention; tied head scaled by D**-0.5 (not a matmul)
    "encoder-decoder": ("t5-tiny", {}),
    "encoder-decoder-untied-deeper-decoder": ("transformer-tiny", dict(n_decoder_layers=3, tie_embeddings=False)),
    # encoder with the MLM + NSP heads (pooler on the first position)
    "encoder-pretraining-heads": ("bert-tiny", {}),
    "encoder-classification": ("bert-tiny", dict(head="classification", n_labels=3)),
    # Longformer's second projection over all tokens + global rows attending every key (dense-mask execution)
    "longformer-global-rows": ("longformer-tiny", dict(sparse=dict(execution="mask", global_tokens=(0, 5)))),
}


@pytest.mark.parametrize("case", MIXED)
def test_analytic_flops_equal_flop_counter_other_kinds(case):
    name, overrides = MIXED[case]
    cfg = presets.get(name, **overrides).replace(attn_kernel="naive")
    B, S, T = 2, 24, 17
    ids = torch.randint(1, cfg.vocab_size, (B, S))
    torch.manual_seed(0)
    model = llmarch.build(cfg).eval()
    kwargs = dict(decoder_input_ids=torch.randint(1, cfg.vocab_size, (B, T))) if cfg.kind == "encoder_decoder" else {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, **kwargs)
    f = forward_flops(cfg, S, B, target_len=T)
    assert counter.get_total_flops() == f.forward
    if cfg.kind == "encoder_decoder":
        assert f.cross_attention > 0 and sum(f.by_stack.values()) == f.linear + f.attention
