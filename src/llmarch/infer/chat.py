"""Multi-turn chat over any model + tokenizer: a plain-text transcript ("User: ...\\nAssistant: ..."), replies
streamed as text, history that forgets its oldest tokens when the context fills up. The tokenizer is any object
with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` (``bos_id`` / ``eos_id`` used when present).
:func:`repl` is the interactive loop behind ``llmarch chat``."""
from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

from llmarch.infer.generate import generate
from llmarch.tokenizer import encode_prompt


class TextStream:
    """Turns streamed token ids into text deltas: decodes everything so far and hands on the new suffix, holding
    back an incomplete UTF-8 character and any tail that could be the start of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None],
                 stops: tuple[str, ...] = ()):
        self.decode, self.on_text, self.stops = decode, on_text, stops
        self.ids: list[int] = []
        self.sent = 0

    def _safe_end(self, text: str) -> int:
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for stop in self.stops:
            for n in range(min(len(stop), end), 0, -1):  # longest tail that is a prefix of the stop string
                if text[:end].endswith(stop[:n]):
                    end -= n
                    break
        return end

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.decode(self.ids)
        end = self._safe_end(text)
        if end > self.sent:
            self.on_text(text[self.sent:end])
            self.sent = end

    def finish(self, final: str) -> None:
        """Send what is left of the final (stop-trimmed) reply."""
        if len(final) > self.sent:
            self.on_text(final[self.sent:])


class Chat:
    """A conversation with a model. ``send(message)`` returns the reply and records both in ``history``."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.7, top_k: int | None = None, top_p: float | None = 0.9,
                 min_p: float | None = None, repetition_penalty: float = 1.1, seed: int | None = 0,
                 user: str = "User", assistant: str = "Assistant", cache: str = "static"):
        if max_new_tokens >= model.config.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                             f"context (max_seq_len={model.config.max_seq_len})")
        self.model, self.tokenizer, self.system = model.eval(), tokenizer, system
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repetition_penalty=repetition_penalty, cache=cache)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.user, self.assistant = user, assistant
        self.stops = (f"\n{user}:",)
        self.history: list[tuple[str, str]] = []

    def transcript(self, message: str) -> str:
        turns = [self.system + "\n"] if self.system else []
        turns += [f"{self.user}: {u}\n{self.assistant}: {a}\n" for u, a in self.history]
        return "".join(turns) + f"{self.user}: {message}\n{self.assistant}:"

    def prompt_ids(self, message: str) -> list[int]:
        """The transcript's ids (the tokenizer's BOS/EOS rule, :func:`~llmarch.tokenizer.encode_prompt`), the text
        between them cut from the left to leave room for the reply."""
        ids = encode_prompt(self.tokenizer, self.transcript(message))
        empty = encode_prompt(self.tokenizer, "")  # the specials alone: what the rule puts before and after
        head = next((i for i, (a, b) in enumerate(zip(ids, empty)) if a != b), min(len(ids), len(empty)))
        tail = len(empty) - head
        room = self.model.config.max_seq_len - self.settings["max_new_tokens"] - len(empty)
        body = ids[head:len(ids) - tail]
        return ids[:head] + body[max(len(body) - room, 0):] + ids[len(ids) - tail:]

    def send(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        ids = torch.tensor([self.prompt_ids(message)])
        stream = TextStream(self.tokenizer.decode, on_text, self.stops) if on_text else None
        out = generate(self.model, ids, eos_token_id=getattr(self.tokenizer, "eos_id", None),
                       stop_strings=self.stops, decode=self.tokenizer.decode, generator=self.generator,
                       streamer=stream, **self.settings)
        new = out[0, ids.shape[1]:].tolist()
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        reply = self.tokenizer.decode(new)
        for stop in self.stops:
            reply = reply.split(stop)[0]
        if stream is not None:
            stream.finish(reply)
        reply = reply.strip()
        self.history.append((message, reply))
        return reply

    def reset(self) -> None:
        self.history.clear()


USER_LABEL, MODEL_LABEL = "you> ", "model> "


def repl(chat: Chat, read: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    """Read messages (prompted ``you> ``) until /quit or end of input; /reset forgets the history. Each reply
    streams to ``out`` after a ``model> `` label."""
    out = out or sys.stdout

    def emit(text: str) -> None:
        out.write(text)
        out.flush()

    emit("llmarch chat: type a message; /reset clears the history, /quit leaves.\n")
    while True:
        try:
            line = read(USER_LABEL).strip()
        except EOFError:
            return 0
        if line == "/quit":
            return 0
        if line == "/reset":
            chat.reset()
            emit("(history cleared)\n")
            continue
        if line:
            emit(MODEL_LABEL)
            chat.send(line, on_text=emit)
            emit("\n")
