"""`llmarch eval`: perplexity and bits per byte against a naive token-by-token scorer; the lm-evaluation-harness
model's three request types against plain forward passes and generate, and a run of local task files."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import llmarch
from llmarch.checkpoint import save_model
from llmarch.cli import main
from llmarch.eval import rolling_windows, score_texts
from llmarch.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "hello world, hello fox", "é"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS * 10, 300)
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                               d_ff=64, max_seq_len=64)
    model = llmarch.build(cfg).eval()
    d = tmp_path_factory.mktemp("eval") / "ckpt"
    save_model(model, d)
    tok.save(d)
    return SimpleNamespace(model=model, tok=tok, dir=d)


def naive_logprob(model, context: list[int], target: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    return float(torch.log_softmax(logits.double(), -1)[target])


def test_rolling_windows_predict_every_token_once():
    ws = rolling_windows(0, list(range(10, 21)), prefix=1, max_len=4)
    assert [t for w in ws for t in w.targets] == list(range(10, 21))
    assert all(len(w.ids) <= 4 and len(w.targets) == len(w.ids) for w in ws)
    assert ws[0].ids == [1, 10, 11, 12] and ws[1].ids == [13, 14, 15, 16]  # inputs are the tokens before


def test_perplexity_matches_token_by_token_scoring(lm, monkeypatch):
    L = 8
    monkeypatch.setattr("llmarch.eval.perplexity.WINDOWS_PER_ROUND", 2)  # several scoring rounds
    s = score_texts(lm.model, lm.tok, TEXTS, max_len=L, batch_size=3)
    nll = 0.0
    for text in TEXTS:
        stream = [lm.tok.bos_id] + lm.tok.encode(text)
        for j in range(1, len(stream)):  # token j sees its window's earlier tokens: from ((j-1)//L)·L
            nll -= naive_logprob(lm.model, stream[(j - 1) // L * L:j], stream[j])
    assert s.tokens == sum(len(lm.tok.encode(t)) for t in TEXTS)
    assert s.bytes == sum(len(t.encode()) for t in TEXTS)
    assert s.nll == pytest.approx(nll, rel=1e-5)
    assert s.bits_per_byte == pytest.approx(nll / math.log(2) / s.bytes, rel=1e-5)
    assert s.perplexity == pytest.approx(math.exp(nll / s.tokens), rel=1e-5)


def test_eval_verb_on_a_file_and_a_folder(lm, tmp_path, capsys):
    for i, t in enumerate(TEXTS):
        (tmp_path / f"{i}.txt").write_text(t)
    assert main(["eval", "--checkpoint", str(lm.dir), "--data", str(tmp_path), "--json", "--seq-len", "8"]) == 0
    d = json.loads(capsys.readouterr().out)
    ref = score_texts(lm.model, lm.tok, TEXTS, max_len=8)
    assert d["files"] == 3 and d["tokens"] == ref.tokens and d["bits_per_byte"] == pytest.approx(ref.bits_per_byte)
    assert d["tokens_per_s"] > 0 and d["perplexity"] == pytest.approx(ref.perplexity)
    assert main(["eval", "--checkpoint", str(lm.dir), "--data", str(tmp_path / "[01].txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 2  # a glob
    assert main(["eval", "--checkpoint", str(lm.dir), "--data", str(tmp_path / "0.txt")]) == 0
    assert "bits per byte" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(lm.dir), "--data", str(tmp_path / "nope.txt")]) == 2
    assert main(["eval", "--checkpoint", str(lm.dir), "--data", str(tmp_path), "--batch-size", "0"]) == 2


def test_eval_refuses_an_encoder(tmp_path):
    model = llmarch.build(llmarch.preset("bert-tiny"))
    with pytest.raises(ValueError, match="kind: perplexity needs a decoder"):
        score_texts(model, train_tokenizer(TEXTS, 300), TEXTS)


# --- lm-evaluation-harness ---------------------------------------------------------------------------------------
def req(*args):
    return SimpleNamespace(args=args)


def test_harness_requests_match_plain_forward_passes(lm):
    import lm_eval  # noqa: F401  (the test extra installs it)
    from llmarch.eval.harness import LlmarchLM

    h = LlmarchLM(model=lm.model, tokenizer=lm.tok, batch_size=2)
    pairs = [("the quick brown", " fox"), ("hello", " world, hello"), ("", "the lazy dog")]
    got = h.loglikelihood([req(c, x) for c, x in pairs])
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        whole = lm.tok.encode(ctx + cont)
        n_ctx = len(lm.tok.encode(ctx)) if ctx else 0
        stream = ([lm.tok.bos_id] if not ctx else []) + whole
        n_ctx = n_ctx or 1
        want = sum(naive_logprob(lm.model, stream[:j], stream[j]) for j in range(n_ctx, len(stream)))
        assert logp == pytest.approx(want, rel=1e-5)
        with torch.no_grad():
            argmax = lm.model(torch.tensor([stream[:-1]])).logits[0, n_ctx - 1:].argmax(-1).tolist()
        assert greedy == (argmax == stream[n_ctx:])
    rolling = h.loglikelihood_rolling([req(t) for t in TEXTS])
    assert sum(rolling) == pytest.approx(-score_texts(lm.model, lm.tok, TEXTS).nll, rel=1e-6)
    [text] = h.generate_until([req("the quick", {"until": ["dog"], "max_gen_toks": 6})])
    ids = lm.tok.encode("the quick")
    out = llmarch.generate(lm.model, torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
    assert text == lm.tok.decode(out).split("dog")[0]


TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
{extra}"""


def test_harness_runs_local_tasks(lm, tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llmarch.eval.harness  # noqa: F401  (registers "llmarch")

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in (
        {"q": "the quick brown", "choices": [" fox", " dog"], "answer": 0, "text": TEXTS[0]},
        {"q": "hello", "choices": [" world", " fox"], "answer": 0, "text": TEXTS[1]})))
    tasks = {"t_mc": ("multiple_choice", 'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
                                         'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
             "t_ppl": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                                'metric_list:\n  - metric: bits_per_byte\n'),
             "t_gen": ("generate_until", 'doc_to_text: "{{q}}"\ndoc_to_target: "{{choices[answer]}}"\n'
                                         'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n'
                                         'metric_list:\n  - metric: exact_match\n')}
    for name, (kind, extra) in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(TASK.format(name=name, data=data, kind=kind, extra=extra))
    res = lm_eval.simple_evaluate(model="llmarch", model_args={"checkpoint": str(lm.dir)}, tasks=list(tasks),
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    r = res["results"]
    assert r["t_mc"]["acc,none"] in (0.0, 0.5, 1.0) and r["t_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    ref = score_texts(lm.model, lm.tok, TEXTS[:2])
    assert r["t_ppl"]["bits_per_byte,none"] == pytest.approx(ref.bits_per_byte, rel=1e-5)
