"""Chat templates: ids and loss mask equal transformers' (``return_assistant_tokens_mask``) for a template with
``{% generation %}``; templates without it train on assistant content + end of turn; llmarch's built-in template."""
from __future__ import annotations

import json

import pytest

from llmarch.tokenizer import load_tokenizer_for, train_tokenizer

GEN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_TEMPLATE = GEN_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4, of course."},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "Six."}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = ["What is 2 + 2? 4, of course. And 3 + 3? Six. You are terse."] * 20
    tok = train_tokenizer(texts, vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def with_template(d, template):
    cfg = {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>",
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_generation_template_matches_transformers(tok_dir):
    import transformers

    d = with_template(tok_dir, GEN_TEMPLATE)
    ours = load_tokenizer_for(d)
    ids, mask = ours.apply_chat_template(MESSAGES)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(d)
    ref = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])
    assert sum(mask) > 0 and ids[0] == ours.inner.token_to_id("<s>")
    prompt, _ = ours.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    assert prompt == list(hf.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    saved = tok_dir.parent / "saved_by_transformers"  # the template may live in chat_template.jinja
    hf.save_pretrained(saved)
    assert load_tokenizer_for(saved).apply_chat_template(MESSAGES) == (ids, mask)


def test_plain_template_trains_on_content_and_end_of_turn(tok_dir):
    d = with_template(tok_dir, PLAIN_TEMPLATE)
    tok = load_tokenizer_for(d)
    ids, mask = tok.apply_chat_template(MESSAGES)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "4, of course.<|im_end|>Six.<|im_end|>"


def test_builtin_template_adds_role_tokens(tok_dir, tmp_path):
    (tok_dir / "tokenizer_config.json").unlink(missing_ok=True)
    base = load_tokenizer_for(tok_dir)
    assert base.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        base.apply_chat_template(MESSAGES)
    tok = base.with_chat_roles()
    assert tok.vocab_size == base.vocab_size + 4
    ids, mask = tok.apply_chat_template(MESSAGES)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4, of course.<|end|>Six.<|end|>"
    assert tok.inner.token_to_id("<|end|>") in tok.end_of_turn_ids
    tok.save(tmp_path)  # the template travels in tokenizer_config.json
    assert load_tokenizer_for(tmp_path).apply_chat_template(MESSAGES) == (ids, mask)
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tok.apply_chat_template([MESSAGES[0], {"role": "robot", "content": "x"}])
