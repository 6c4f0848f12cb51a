"""Chat templates: a conversation (a list of ``{"role", "content"}`` messages) rendered to text by a Jinja
template, with the character spans of the assistant's text that training learns from.

The environment is the one transformers renders ``tokenizer_config.json``'s ``chat_template`` in
(``utils/chat_template_utils.py``): a sandbox with ``trim_blocks`` / ``lstrip_blocks``, loop controls,
``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, and the ``{% generation %}`` tag
that marks assistant text. Where a template has no ``{% generation %}`` tag, the trained span of an assistant
message is what the template adds for it after the generation prompt (its content and end-of-turn token).
"""
from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager
from datetime import datetime

# our tokenizers' role tokens and template (added to the vocabulary when a tokenizer has no template of its own)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_tag(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The template compiled in transformers' chat-template environment (sandboxed)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span of the text inside."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(track_generation=self.track)
            self._blocks = self._spans = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            if self._blocks is not None:
                start = len("".join(self._blocks))
                self._spans.append((start, start + len(text)))
            return text

        @contextmanager
        def track(self, blocks: list, spans: list):
            self._blocks, self._spans = blocks, spans
            try:
                yield
            finally:
                self._blocks = self._spans = None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def check_messages(messages) -> list[dict]:
    """Messages as plain dicts with a known role and string content; a ValueError naming the bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: role {m['role']!r} is not one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]: content must be a string, got {type(m['content']).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render(template: str, messages: list[dict], add_generation_prompt: bool = False,
           **variables) -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end) character spans inside ``{% generation %}`` blocks])."""
    import jinja2

    compiled = compile_template(template)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        with compiled.environment.track_generation(blocks, spans):
            for block in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **variables):
                blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {e}") from None
    return "".join(blocks), spans


def assistant_spans(template: str, messages: list[dict], **variables) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans trained on: the ``{% generation %}`` blocks when the
    template has them; otherwise, per assistant message, the text the template adds for it after the generation
    prompt of the conversation before it (trailing whitespace not included)."""
    text, spans = render(template, messages, **variables)
    if has_generation_tag(template):
        return text, spans
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = render(template, messages[:i], add_generation_prompt=True, **variables) if i else ("", [])
        upto, _ = render(template, messages[:i + 1], **variables)
        if text.startswith(upto) and upto.startswith(before):
            start, end = len(before), len(upto.rstrip())
        else:  # a template that renders earlier turns differently: the content itself, found in order
            start = text.find(m["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise ValueError(f"chat_template: assistant message {i} does not appear in the rendered text")
            end = start + len(m["content"])
        if end > start:
            spans.append((start, end))
    return text, spans


__all__ = ["BUILTIN_TEMPLATE", "ROLE_TOKENS", "END_OF_TURN", "render", "assistant_spans", "check_messages",
           "compile_template", "has_generation_tag"]
