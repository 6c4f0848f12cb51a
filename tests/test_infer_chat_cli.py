"""Chat (Python API and REPL) with a tiny byte-level tokenizer written here; the CLI verbs added for
inference (generate streaming with a preset, --dtype bf16, convert --quantize)."""
from __future__ import annotations

import io
import json

import torch

import llmarch
from llmarch.checkpoint import load_model, save_model
from llmarch.cli import main
from llmarch.cli.common import load_for_inference
from llmarch.infer.chat import Chat, TextStream, repl
from llmarch.infer.quantize import Int8Linear


class ByteTokenizer:
    """UTF-8 bytes as ids; 256 = bos, 257 = eos."""

    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def chat_model():
    torch.manual_seed(0)
    cfg = llmarch.preset("llama-tiny").replace(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                               d_ff=64, max_seq_len=96)
    return llmarch.build(cfg).eval()


def test_chat_keeps_history_streams_and_resets():
    chat = Chat(chat_model(), ByteTokenizer(), system="Be brief.", max_new_tokens=12, temperature=0.0,
                repetition_penalty=1.0)
    parts: list[str] = []
    first = chat.send("hello", on_text=parts.append)
    ids = chat.prompt_ids("again")  # the second prompt carries the first exchange
    assert "User: hello\nAssistant: " in ByteTokenizer().decode(ids) and first in ByteTokenizer().decode(ids)
    assert "".join(parts).strip() == first
    # the reply is the greedy continuation of the transcript, decoded
    prompt = [256] + list(b"Be brief.\nUser: hello\nAssistant:")
    want = llmarch.generate(chat.model, torch.tensor([prompt]), 12, eos_token_id=257)[0, len(prompt):].tolist()
    assert first == ByteTokenizer().decode([t for t in want if t != 257]).split("\nUser:")[0].strip()
    for i in range(8):  # a long conversation is cut from the left to fit the context
        chat.send(f"message number {i}")
        assert len(chat.prompt_ids("x")) <= 96 - 12
    chat.reset()
    assert chat.history == [] and chat.transcript("hi") == "Be brief.\nUser: hi\nAssistant:"


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    out: list[str] = []
    stream = TextStream(ByteTokenizer().decode, out.append, stops=("\nUser:",))
    for b in "é ok\nUs".encode():
        stream(torch.tensor([b]))
    assert "".join(out) == "é ok"  # "\nUs" could start the stop string
    stream.finish("é ok")
    assert "".join(out) == "é ok"


def test_repl_commands():
    chat = Chat(chat_model(), ByteTokenizer(), max_new_tokens=6, temperature=0.0)
    lines = iter(["hi", "/reset", "", "there", "/quit", "never read"])
    out = io.StringIO()
    assert repl(chat, read=lambda prompt: next(lines), out=out) == 0
    assert "(history cleared)" in out.getvalue() and len(chat.history) == 1 and chat.history[0][0] == "there"


def test_cli_generate_streams_preset_tokens(capsys):
    assert main(["generate", "--preset", "gpt2-tiny", "--prompt", "1 2 3", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    toks = capsys.readouterr().out.split()
    assert len(toks) == 8 and toks[:3] == ["1", "2", "3"]
    torch.manual_seed(0)  # the CLI seeds torch with --seed 0 before building
    model = llmarch.build(llmarch.preset("gpt2-tiny")).eval()
    assert [int(t) for t in toks] == llmarch.generate(model, torch.tensor([[1, 2, 3]]), 5)[0].tolist()


def test_cli_generate_and_chat_in_bf16(tmp_path, capsys):
    """``--dtype bf16`` (generate and chat): the preset's model converted to bf16 gives the tokens printed; a
    checkpoint loads in bf16; a quantized checkpoint refuses bf16 in one line."""
    assert main(["generate", "--preset", "gpt2-tiny", "--prompt", "1 2 3", "--max-new-tokens", "5",
                 "--temperature", "0", "--dtype", "bf16"]) == 0
    toks = [int(t) for t in capsys.readouterr().out.split()]
    torch.manual_seed(0)
    model = llmarch.build(llmarch.preset("gpt2-tiny")).eval().to(torch.bfloat16)
    assert toks == llmarch.generate(model, torch.tensor([[1, 2, 3]]), 5)[0].tolist()
    save_model(chat_model(), tmp_path / "fp32")
    loaded = load_for_inference(tmp_path / "fp32", "bf16")
    assert not loaded.training and {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert main(["convert", str(tmp_path / "fp32"), str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    capsys.readouterr()
    for verb in ("generate", "chat"):
        assert main([verb, "--checkpoint", str(tmp_path / "int8"), "--dtype", "bf16"]) == 2
        err = capsys.readouterr().err
        assert "--dtype bf16" in err and "quantized" in err and "Traceback" not in err


def test_cli_convert_quantize(tmp_path, capsys):
    save_model(chat_model(), tmp_path / "fp32")
    assert main(["convert", str(tmp_path / "fp32"), str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantize"] == "int8"
    model = load_model(tmp_path / "int8")
    assert isinstance(model.lm_head.proj, Int8Linear)  # inside the head, which keeps its outputs()
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < (tmp_path / "fp32" / "model.safetensors").stat().st_size
