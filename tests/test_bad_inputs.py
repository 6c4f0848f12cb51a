"""Issue 14, item 9: bad decode inputs are refused by argument name on every cache (static, dynamic), and both
caches apply one context rule: a learned position table ends at max_seq_len (prompt + max_new_tokens must fit),
RoPE/ALiBi run past it, with the same tokens from either cache."""
from __future__ import annotations

import pytest
import torch

import llmarch
from llmarch.cli import main

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)


def model(**over):
    torch.manual_seed(0)
    return llmarch.build(llmarch.preset("llama-tiny").replace(**{**SMALL, **over})).eval()


@pytest.fixture(scope="module")
def rope():
    return model()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("ids, kw, words", [
    ([[1, 99999]], {}, "input_ids: token id 99999 is outside the vocabulary"),
    ([[1, -3]], {}, "input_ids: token id -3"),
    ([[[1, 2]]], {}, "input_ids must be \\[batch, seq\\]"),
    ([[1, 2]], dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer, got 2.5"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    ([[1, 2]], dict(max_new_tokens=-4), "max_new_tokens must be a positive integer"),
    ([[1, 2]], dict(temperature=float("nan")), "temperature must be a finite number"),
    ([[1, 2]], dict(temperature=1.0, top_p=0.0), "top_p must be in \\(0, 1\\]"),
    ([[1, 2]], dict(temperature=1.0, top_p=1.5), "top_p must be in \\(0, 1\\]"),
    ([[1, 2]], dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
    ([[1, 2]], dict(temperature=1.0, top_k=-1), "top_k must be a positive integer"),
])
def test_bad_arguments_are_refused_by_name(rope, cache, ids, kw, words):
    with pytest.raises(ValueError, match=words):
        llmarch.generate(rope, torch.tensor(ids), **{"max_new_tokens": 2, **kw}, cache=cache)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_learned_table_ends_at_max_seq_len_for_both_caches(cache):
    learned = model(position="learned")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert llmarch.generate(learned, ids, max_new_tokens=10, cache=cache).shape == (1, 16)  # exactly fills it
    with pytest.raises(ValueError, match=r"prompt \(6 tokens\) \+ max_new_tokens \(11\) = 17 positions exceed the "
                                         r"model's learned position table \(max_seq_len=16\).* lower max_new_tokens "
                                         r"to 10"):
        llmarch.generate(learned, ids, max_new_tokens=11, cache=cache)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_rope_and_alibi_run_past_max_seq_len_with_both_caches_alike(position):
    m = model(position=position)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    static = llmarch.generate(m, ids, max_new_tokens=20, cache="static")
    dynamic = llmarch.generate(m, ids, max_new_tokens=20, cache="dynamic")
    assert static.shape == (1, 26) and torch.equal(static, dynamic)  # no silent truncation on either


def test_cli_bad_prompts_are_one_line_errors(capsys):
    for argv, words in ((["--prompt", "1 99999"], "input_ids: token id 99999"),
                        (["--prompt", "one two"], "--prompt: with --preset the prompt is token ids"),
                        (["--prompt", "1 2", "--temperature", "nan"], "temperature must be a finite number"),
                        (["--prompt", "1 2", "--max-new-tokens", "0"], "max_new_tokens must be a positive")):
        assert main(["generate", "--preset", "llama-tiny", "--max-new-tokens", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_a_static_cache_too_large_to_allocate_is_refused_by_name(rope):
    with pytest.raises(ValueError, match=r"max_new_tokens: a static cache of \d+ slots needs .* GiB"):
        llmarch.generate(rope, torch.tensor([[1, 2]]), max_new_tokens=10**12, cache="static")
