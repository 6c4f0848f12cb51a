"""Issue 14, item 5: a prompt is encoded as transformers' tokenizer encodes it for the same files (BOS/EOS from
tokenizer.json's post-processor; transformers >= 5 drops tokenizer_config.json's add_bos_token / add_eos_token
when a tokenizer.json exists, and the cases below hold us to that), by one path shared by ``generate``, ``chat``
and the Python API; so ``llmarch generate --checkpoint HF_DIR`` greedy output equals transformers'."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import processors

import llmarch
from llmarch.cli import main
from llmarch.infer.chat import Chat
from llmarch.tokenizer import encode_prompt, load_tokenizer_for, train_tokenizer
from tests.hf_util import make_hf_model

TEXT = "the quick brown fox jumps over the lazy dog; a lazy dog sleeps. " * 4
PROMPT = "the lazy fox"


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer([TEXT], vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])


def write_tokenizer(bpe, d, config: dict, template: bool = False) -> None:
    inner = bpe.inner.__class__.from_str(bpe.to_json())
    if template:  # a post-processor in tokenizer.json itself (most Hugging Face checkpoints)
        inner.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 $B:1",
                                                             special_tokens=[("<s>", 1)])
    inner.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                        "bos_token": "<s>", "eos_token": "</s>", **config}))


@pytest.mark.parametrize("config, template", [({"add_bos_token": True}, False), ({}, True), ({}, False),
                                              ({"add_bos_token": False, "add_eos_token": True}, True)],
                         ids=["add_bos_token_only", "post_processor", "neither", "post_processor_and_add_flags"])
def test_prompt_ids_equal_transformers(bpe, tmp_path, config, template):
    import transformers

    write_tokenizer(bpe, tmp_path, config, template)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)(PROMPT)["input_ids"]
    assert encode_prompt(load_tokenizer_for(tmp_path), PROMPT) == theirs


def test_generate_cli_and_chat_encode_like_transformers(bpe, tmp_path, capsys):
    import transformers

    cfg = llmarch.preset("llama-tiny").replace(vocab_size=bpe.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                               n_kv_heads=2, d_ff=64, max_seq_len=64, bos_token_id=1,
                                               eos_token_id=None, pad_token_id=None)
    hf_model, d = make_hf_model(cfg, "llama", tmp_path)
    write_tokenizer(bpe, d, {"add_bos_token": True}, template=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    ids = hf_tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 1  # transformers puts BOS first
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    new = new[:new.index(2)] if 2 in new else new  # the CLI stops at the tokenizer's EOS
    assert main(["generate", "--checkpoint", str(d), "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--temperature", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out == PROMPT + hf_tok.decode(new) + "\n"
    chat = Chat(llmarch.hf.load(d), load_tokenizer_for(d), max_new_tokens=4)
    assert chat.prompt_ids("hi") == hf_tok(chat.transcript("hi"))["input_ids"]


def test_a_prompt_that_is_not_utf8_is_refused_by_name(bpe):
    with pytest.raises(ValueError, match="prompt: not valid UTF-8"):
        encode_prompt(bpe, "caf\udce9")  # how Python hands over the byte 0xe9 of a Latin-1 command line
