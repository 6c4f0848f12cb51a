"""Parity with transformers' Mamba2ForCausalLM: config round trip, fp32 logits on a left-padded batch, greedy
generation (prefill in chunks, then the recurrent step), save round trip; preset parameter counts equal
transformers' model built on the meta device."""
from __future__ import annotations

import pytest
import torch
import transformers

import llmarch
from llmarch.analysis.params import meta_param_count
from llmarch.hf.io import family
from tests.hf_util import (causal_pair, check_config_round_trip, check_greedy_generation, check_padded_logits,
                           check_save_reloads)

CASES = {  # chunk 4 < the 14-token prompts, so several chunks and a padded last chunk are compared
    "mamba2-groups": llmarch.preset("mamba2-tiny").replace(vocab_size=199, ssm=dict(chunk_size=4)),
    "mamba2-untied-bias": llmarch.preset("mamba2-tiny").replace(
        vocab_size=199, n_layers=3, tie_embeddings=False, ssm=dict(chunk_size=5, n_groups=1, conv_bias=False,
                                                                   time_step_limit_high=0.05)),
}


@pytest.fixture(params=sorted(CASES), scope="module")
def pair(request, tmp_path_factory):
    return causal_pair(request.param, "mamba2", CASES[request.param], tmp_path_factory.mktemp(request.param))


def test_config_round_trip(pair):
    check_config_round_trip(pair)


def test_padded_logits(pair):
    check_padded_logits(pair)


def test_greedy_generation(pair):
    check_greedy_generation(pair)


def test_save_reloads(pair):
    check_save_reloads(pair)


@pytest.mark.parametrize("name", ["mamba2-130m", "mamba2-2.7b"])
def test_preset_counts_match_transformers(name):
    cfg = llmarch.preset(name)
    hf_cfg = transformers.Mamba2Config(**{k: v for k, v in family("mamba2").from_config(cfg).items()
                                          if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == meta_param_count(cfg) == llmarch.presets.PUBLISHED_PARAMS[name]
