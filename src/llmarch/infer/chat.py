"""Multi-turn chat over any model + tokenizer: a plain-text transcript ("User: ...\\nAssistant: ..."), replies
streamed as text, history that forgets its oldest tokens when the context fills up. The tokenizer is any object
with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` (``bos_id`` / ``eos_id`` used when present).
:func:`repl` is the interactive loop behind ``llmarch chat``."""
from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

from llmarch.infer.generate import generate
from llmarch.infer.images import model_inputs, with_image_tokens
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
                 user: str = "User", assistant: str = "Assistant", cache: str = "static", processor=None):
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
        self.processor = processor  # PIL image -> pixel_values (vision-language models)
        self.images: dict | None = None  # the image of the conversation, encoded (pixel_values [1, C, H, W], ...)
        # a tokenizer with a chat template (tokenizer_config.json, or llmarch's after finetune) formats the turns
        # as the model was tuned on them and ends a reply at its end-of-turn tokens
        self.templated = getattr(tokenizer, "chat_template", None) is not None
        eos = getattr(tokenizer, "eos_id", None)
        self.stop_ids = list(tokenizer.end_of_turn_ids) if self.templated else ([eos] if eos is not None else [])
        if self.templated:
            self.stops = ()

    def add_image(self, path: str) -> None:
        """Attach the image at ``path`` to the conversation (``/image PATH``); its tokens lead the transcript."""
        from llmarch.image_processing import load_image
        from llmarch.infer.images import encode_images, processor_for

        self.images = encode_images(self.processor or processor_for(self.model), [load_image(path)])

    def transcript(self, message: str) -> str:
        turns = [self.system + "\n"] if self.system else []
        turns += [f"{self.user}: {u}\n{self.assistant}: {a}\n" for u, a in self.history]
        return "".join(turns) + f"{self.user}: {message}\n{self.assistant}:"

    def messages(self, message: str, turns: int | None = None) -> list[dict]:
        """The conversation as chat messages: the system line, the last ``turns`` exchanges, the new message."""
        history = self.history if turns is None else self.history[len(self.history) - turns:]
        out = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in history:
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return out + [{"role": "user", "content": message}]

    def prompt_ids(self, message: str) -> list[int]:
        """The transcript's ids (the tokenizer's BOS/EOS rule, :func:`~llmarch.tokenizer.encode_prompt`), the text
        between them cut from the left to leave room for the reply; with a chat template, the template's ids
        (the oldest exchanges forgotten first)."""
        if self.templated:
            room = self.model.config.max_seq_len - self.settings["max_new_tokens"]
            for turns in range(len(self.history), -1, -1):
                ids, _ = self.tokenizer.apply_chat_template(self.messages(message, turns), add_generation_prompt=True)
                if len(ids) <= room:
                    return ids
            return ids[-room:]
        ids = encode_prompt(self.tokenizer, self.transcript(message))
        empty = encode_prompt(self.tokenizer, "")  # the specials alone: what the rule puts before and after
        head = next((i for i, (a, b) in enumerate(zip(ids, empty)) if a != b), min(len(ids), len(empty)))
        tail = len(empty) - head
        images = [] if self.images is None else with_image_tokens([], self.model.config.vision)
        room = self.model.config.max_seq_len - self.settings["max_new_tokens"] - len(empty) - len(images)
        body = ids[head:len(ids) - tail]
        return ids[:head] + images + body[max(len(body) - room, 0):] + ids[len(ids) - tail:]

    def send(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        prompt = self.prompt_ids(message)
        ids = torch.tensor([prompt])
        stream = TextStream(self.tokenizer.decode, on_text, self.stops) if on_text else None
        settings = self.settings if self.images is None else \
            dict(self.settings, cache="dynamic", **model_inputs(self.model, prompt, self.images))
        stop_ids = self.stop_ids
        out = generate(self.model, ids, eos_token_id=stop_ids[0] if stop_ids else None,
                       stop_sequences=[[i] for i in stop_ids[1:]], stop_strings=self.stops or None,
                       decode=self.tokenizer.decode, generator=self.generator, streamer=stream, **settings)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:next((j for j, t in enumerate(new) if t in stop_ids), len(new))]
        reply = self.tokenizer.decode(new, **({"skip_special_tokens": True} if self.templated else {}))
        for stop in self.stops:
            reply = reply.split(stop)[0]
        if stream is not None:
            stream.finish(reply)
        reply = reply.strip()
        self.history.append((message, reply))
        return reply

    def reset(self) -> None:
        self.history.clear()
        self.images = None


USER_LABEL, MODEL_LABEL = "you> ", "model> "


def repl(chat: Chat, read: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    """Read messages (prompted ``you> ``) until /quit or end of input; /reset forgets the history. Each reply
    streams to ``out`` after a ``model> `` label."""
    out = out or sys.stdout

    def emit(text: str) -> None:
        out.write(text)
        out.flush()

    emit("llmarch chat: type a message; /reset clears the history, /image PATH attaches an image, /quit "
         "leaves.\n")
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
        if line.startswith("/image"):
            try:
                chat.add_image(line[len("/image"):].strip())
                emit("(image attached)\n")
            except (ValueError, FileNotFoundError, OSError) as e:
                emit(f"error: {e}\n")
            continue
        if line:
            emit(MODEL_LABEL)
            chat.send(line, on_text=emit)
            emit("\n")
