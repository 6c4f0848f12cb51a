"""Token-id validation: a clear error in eager mode, and no graph break under torch.compile (the range check reads
numbers back from the device, so it is skipped while tracing)."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.model import check_input_ids


def test_bad_token_ids_are_refused_in_eager_mode():
    model = llmarch.build(llmarch.preset("llama-tiny", vocab_size=50, d_model=32, n_layers=1, d_ff=64))
    with pytest.raises(ValueError, match=r"input_ids: token id 50 is outside the vocabulary \[0, 50\)"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match="input_ids: token id -1 is outside"):
        model(torch.tensor([[-1, 2]]))


def test_range_check_does_not_break_a_compiled_graph():
    def f(ids):
        B, T = check_input_ids(ids, 10)
        return ids * B * T

    compiled = torch.compile(f, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(compiled(ids), f(ids))
