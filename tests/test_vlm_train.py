"""The tiny vision-language model path: image-text pairs encoded with the loss on the answer only, a short
`llmarch train --images` run (checkpoint, metrics with images/s, held-out accuracy), then the checkpoint answering
through `llmarch generate --image` and chat's /image."""
import json

import pytest
import torch

import llmarch
from llmarch.train.image_text import SOURCES, encode_pairs, split


class CharTok:
    """A stand-in tokenizer: one id per character, 0 pad, 1 bos, 2 eos."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text):
        return [3 + ord(c) % 100 for c in text]


@pytest.mark.parametrize("name", ["llava-tiny", "llava-tiny-xattn"])
def test_pairs_train_on_the_answer_and_carry_image_tokens_for_the_projector(name):
    v = llmarch.preset(name).vision
    pairs = SOURCES["shapes"](0, n=3)
    ids, mask, loss_mask = encode_pairs(pairs, CharTok(), v)
    for row, m, lm, p in zip(ids, mask, loss_mask, pairs):
        n = int(m.sum())
        assert row[0] == CharTok.bos_id and row[n - 1] == CharTok.eos_id and not m[n:].any()
        assert lm.sum() == len(p.answer) + 2  # " " + answer + eos
        assert lm[n - 1] == 1 and lm[:n - len(p.answer) - 2].sum() == 0
        images = int((row == v.image_token_id).sum()) if v.image_token_id is not None else 0
        assert images == (v.image_tokens if v.fusion == "projector" else 0)
    prompts, pmask, _ = encode_pairs(pairs, CharTok(), v, with_answer=False)
    assert (prompts[:, -1] == CharTok.encode(CharTok(), ":")[0]).all() and pmask[:, -1].all()  # left-padded


def test_splits_are_disjoint_and_seeded():
    pairs = SOURCES["shapes"](0, n=50)
    train, test = split(pairs, 0.2, 0)
    assert len(test) == 10 and len(train) == 40 and not {id(p) for p in train} & {id(p) for p in test}
    assert [p.answer for p in split(pairs, 0.2, 0)[1]] == [p.answer for p in test]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from llmarch.cli import main

    out = tmp_path_factory.mktemp("vlm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared machine
    try:
        assert main(["train", "--preset", "llava-tiny", "--images", "shapes", "--out", str(out), "--steps", "3",
                     "--batch-size", "4", "--eval-every", "3", "--warmup", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_short_run_writes_checkpoint_metrics_and_accuracy(run):
    summary = json.loads((run / "eval.json").read_text())
    assert summary["fusion"] == "projector" and summary["chance"] == 0.25 and summary["held_out"] == 400
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["images_per_s"] > 0
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"loss", "tokens_per_s", "images_per_s", "val_loss", "accuracy"} <= set(last)


def test_checkpoint_answers_with_an_image_from_the_cli_and_chat(run, tmp_path, capsys):
    from PIL import Image

    from llmarch.checkpoint import load_model
    from llmarch.cli import main
    from llmarch.infer.chat import Chat
    from llmarch.tokenizer import load_tokenizer_for
    from llmarch.train.checkpoints import resolve_model_dir

    path = tmp_path / "shape.png"
    SOURCES["shapes"](1, n=1)[0].image.save(path)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "Q: how many circles? A:", "--image", str(path),
                 "--max-new-tokens", "3", "--temperature", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("Q: how many circles? A:")
    d = resolve_model_dir(run)
    chat = Chat(load_model(d), load_tokenizer_for(d), max_new_tokens=3, temperature=0.0)
    chat.add_image(str(path))
    ids = chat.prompt_ids("hi")
    assert ids.count(chat.model.config.vision.image_token_id) == chat.model.config.vision.image_tokens
    assert isinstance(chat.send("how many circles?"), str)
    assert Image.open(path).size == (32, 32)
