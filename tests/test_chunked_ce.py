"""The chunked cross-entropy equals F.cross_entropy (loss and gradient) and is what the causal_lm objective uses."""
import pytest
import torch
import torch.nn.functional as F

from llmarch.train.chunked_ce import ChunkedCrossEntropy, chunked_ce_sum
from llmarch.train.objectives import ce_sum


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_loss_and_grad_match_cross_entropy_fp32(rows):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 37, 101, dtype=torch.float64)).float().requires_grad_()
    labels = torch.randint(0, 101, (2, 37))
    labels[0, :5] = -100  # ignored positions count nothing and get no gradient
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 0.37, logits)
    ours = chunked_ce_sum(logits, labels, rows=rows)
    (g,) = torch.autograd.grad(ours * 0.37, logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    assert g[0, :5].abs().max() == 0


def test_half_precision_logits_keep_their_dtype_and_match_fp32_reference():
    torch.manual_seed(1)
    logits = torch.randn(64, 50).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (64,))
    ref = F.cross_entropy(logits.float(), labels, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, logits)
    ours = chunked_ce_sum(logits, labels, rows=16)
    (g,) = torch.autograd.grad(ours, logits)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g, g_ref)


def test_objective_loss_goes_through_the_chunked_function():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = ce_sum(logits, torch.randint(0, 11, (2, 5)))
    assert loss.grad_fn.name().startswith(ChunkedCrossEntropy.__name__)


def test_gradcheck_double():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda x: ChunkedCrossEntropy.apply(x, labels, -100, 4), (logits,))
