"""Expert banks re-store their weights column-major in CPU bf16 (a faster grouped product there): the layer's
output stays bit-identical to the row-major bank's, and fp32 goes back to row-major."""
import pytest
import torch

from llmarch import MoEConfig
from llmarch.nn.moe import MoE


@pytest.mark.parametrize("expert_ffn", ["glu", "mlp"])
def test_bf16_bank_is_column_major_and_gives_the_same_output(expert_ffn):
    torch.manual_seed(0)
    layer = MoE(32, 48, "silu", moe=MoEConfig(n_experts=4, top_k=2, expert_ffn=expert_ffn)).eval()
    bank = [p for p in layer.experts.parameters() if p.dim() == 3]
    row_major = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in layer.experts.named_parameters()}
    layer.to(torch.bfloat16)
    assert all(not p.is_contiguous() and p.transpose(1, 2).is_contiguous() for p in bank)
    x = torch.randn(1, 20, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        for n, p in layer.experts.named_parameters():
            assert torch.equal(p, row_major[n])
            p.data = row_major[n]  # the same values laid out row-major
        want = layer(x)
    assert torch.equal(got, want)
    layer.to(torch.bfloat16)  # row-major again here: re-laid on the next move
    assert all(not p.is_contiguous() for p in bank)
    layer.float()
    assert all(p.is_contiguous() for p in bank)
