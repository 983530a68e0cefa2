"""Chat rendering: the checkpoint's own Jinja chat template (rendered the way transformers renders it), with the
hand-written ChatML (Qwen2) and Llama-3 formats as the fallback for tokenizers that carry no template.

Both paths give a ``RenderedChat``: the text ``apply_chat_template(..., tokenize=False)`` returns, and the character
spans whose tokens are trained (the assistant loss mask).

**Templates** are compiled like ``transformers.utils.chat_template_utils`` compiles them: a jinja2
``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a
``{% generation %}`` tag, ``tojson`` (no HTML escaping, ``ensure_ascii=False``), ``raise_exception``,
``strftime_now``, ``dict`` and an underscore-refusing ``namespace``; variables ``messages``,
``add_generation_prompt``, ``tools``/``documents`` (None) and the tokenizer's special tokens that are set
(``bos_token``, ``eos_token``, ...).

**Assistant spans.** Where the template marks ``{% generation %}`` blocks, the spans are exactly those blocks (a
token is trained when it overlaps one: transformers' ``return_assistant_tokens_mask``). Otherwise each
assistant message's content is located in the rendering (``locate_assistant_spans``): messages are searched in
order from a cursor (each found message moves it past its content); before an assistant message the cursor first
skips the template's generation header (what ``add_generation_prompt`` appends, e.g. ``<|im_start|>assistant\n``);
the content is searched verbatim, then stripped (templates that ``trim``); the span covers the content plus the
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...) when that token follows it with only whitespace
between. An empty content's span is the first end-of-turn token from the cursor on. An assistant message whose content cannot be found is an error naming it (mark the template with
``{% generation %}``).
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

ChatFormat = Literal["template", "chatml", "llama3"]
ROLES = ("system", "user", "assistant")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
LLAMA3_BOS, HEADER_START, HEADER_END, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


class ChatError(ValueError):
    """A conversation is malformed (unknown role, non-string content, ...)."""


@dataclass(frozen=True)
class ChatPart:
    """One piece of a rendered conversation."""

    text: str
    special: bool = False
    train: bool = False


def check_messages(messages: Sequence[Mapping[str, object]]) -> None:
    """Raise ``ChatError`` naming the message index when a role is unknown or content is not a string."""
    if not messages:
        raise ChatError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"message {i}: expected an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ChatError(f"message {i}: content must be a string, got {type(content).__name__}")


def render_chatml(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, default_system: str | None = None
) -> list[ChatPart]:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message (Qwen2's template).

    ``default_system`` (Qwen2 uses "You are a helpful assistant.") is inserted when the first message is not
    a system message.
    """
    check_messages(messages)
    parts: list[ChatPart] = []
    if default_system is not None and messages[0]["role"] != "system":
        parts += [ChatPart(IM_START, True), ChatPart("system\n" + default_system), ChatPart(IM_END, True), ChatPart("\n")]
    for m in messages:
        is_assistant = m["role"] == "assistant"
        parts += [
            ChatPart(IM_START, True),
            ChatPart(m["role"] + "\n"),
            ChatPart(m["content"], train=is_assistant),
            ChatPart(IM_END, True, train=is_assistant),
            ChatPart("\n"),
        ]
    if add_generation_prompt:
        parts += [ChatPart(IM_START, True), ChatPart("assistant\n")]
    return parts


def render_llama3(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, bos: str | None = LLAMA3_BOS
) -> list[ChatPart]:
    """Llama-3 instruct: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``."""
    check_messages(messages)
    parts: list[ChatPart] = [ChatPart(bos, True)] if bos else []
    for m in messages:
        is_assistant = m["role"] == "assistant"
        parts += [
            ChatPart(HEADER_START, True),
            ChatPart(m["role"]),
            ChatPart(HEADER_END, True),
            ChatPart("\n\n"),
            ChatPart(m["content"].strip(), train=is_assistant),
            ChatPart(EOT, True, train=is_assistant),
        ]
    if add_generation_prompt:
        parts += [ChatPart(HEADER_START, True), ChatPart("assistant"), ChatPart(HEADER_END, True), ChatPart("\n\n")]
    return parts


def chatml_template(default_system: str | None = None) -> str:
    """The Jinja chat template equivalent to ``render_chatml`` (stored in ``tokenizer_config.json``)."""
    head = ""
    if default_system is not None:
        head = (
            "{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + default_system.replace("'", "\\'") + "<|im_end|>\\n' }}{% endif %}"
        )
    return (
        "{% for message in messages %}" + head
        + "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------------------
# rendered chats
# ------------------------------------------------------------------------------------------------------------
Span = tuple[int, int]


@dataclass(frozen=True)
class RenderedChat:
    """The rendered text and the ``[start, end)`` character spans whose tokens are trained (in order)."""

    text: str
    spans: tuple[Span, ...]


def parts_to_rendered(parts: Sequence[ChatPart]) -> RenderedChat:
    """Join fallback-format parts; consecutive trained parts form one span."""
    spans: list[list[int]] = []
    pos = 0
    for p in parts:
        if p.train and p.text:
            if spans and spans[-1][1] == pos:
                spans[-1][1] = pos + len(p.text)
            else:
                spans.append([pos, pos + len(p.text)])
        pos += len(p.text)
    return RenderedChat("".join(p.text for p in parts), tuple((a, b) for a, b in spans))


# ------------------------------------------------------------------------------------------------------------
# Jinja chat templates, compiled as transformers compiles them
# ------------------------------------------------------------------------------------------------------------
_TRACKING: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("ditto_jax_generation_tracking", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: records the character span of its output while tracking."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        out = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(out)))
        return out


@contextmanager
def _track(blocks: list[str], spans: list[Span]) -> Iterator[None]:
    token = _TRACKING.set((blocks, spans))
    try:
        yield
    finally:
        _TRACKING.reset(token)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` in templates without exposing the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (as transformers does)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed attribute {name!r}")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def compile_template(source: str, origin: str = "<chat template>") -> jinja2.Template:
    """The compiled template; a syntax error raises ``ChatError`` naming ``origin`` and the line."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatError(f"{origin}: chat template line {exc.lineno}: {exc.message}") from exc


def has_generation_marks(source: str) -> bool:
    """Whether the template marks assistant output with ``{% generation %}`` (transformers' test)."""
    return re.search(r"\{\%-?\s*generation\s*-?\%\}", source) is not None


def render_template(
    source: str,
    messages: Sequence[Mapping[str, object]],
    add_generation_prompt: bool = False,
    variables: Mapping[str, object] | None = None,
    origin: str = "<chat template>",
) -> tuple[str, list[Span]]:
    """``(text, generation_spans)``: the rendering and the spans of its ``{% generation %}`` blocks (empty when
    the template has none). A template that raises (``raise_exception``, a bad variable) -> ``ChatError``."""
    template = compile_template(source, origin)
    context = {"tools": None, "documents": None, **(variables or {})}
    context |= {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
    blocks: list[str] = []
    spans: list[Span] = []
    try:
        with _track(blocks, spans):
            for block in template.generate(**context):  # one by one: the generation tag reads `blocks`
                blocks.append(block)  # noqa: PERF402
    except jinja2.TemplateError as exc:
        raise ChatError(f"{origin}: chat template: {exc}") from exc
    return "".join(blocks), spans


def generation_header(source: str, variables: Mapping[str, object] | None = None, origin: str = "<chat template>") -> str:
    """The text ``add_generation_prompt`` appends after a one-turn conversation ("" when it appends nothing or
    the template does not render a prefix-consistent conversation)."""
    probe = [{"role": "user", "content": "x"}]
    try:
        plain, _ = render_template(source, probe, False, variables, origin)
        with_prompt, _ = render_template(source, probe, True, variables, origin)
    except ChatError:
        return ""
    return with_prompt[len(plain):] if with_prompt.startswith(plain) else ""


def _find_content(text: str, content: str, cursor: int) -> tuple[int, int]:
    """``(start, end)`` of ``content`` (verbatim, else stripped) at or after ``cursor``; ``(-1, -1)`` if absent."""
    for candidate in (content, content.strip()):
        pos = text.find(candidate, cursor)
        if pos >= 0:
            return pos, pos + len(candidate)
    return -1, -1


def locate_assistant_spans(
    text: str, messages: Sequence[Mapping[str, str]], header: str, end_tokens: Sequence[str]
) -> list[Span]:
    """Spans of the assistant messages' content (+ their end-of-turn token) in ``text``; rule in the module doc."""
    spans: list[Span] = []
    cursor = 0
    ends = sorted((t for t in end_tokens if t), key=len, reverse=True)
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            start, end = _find_content(text, content, cursor)
            if start >= 0:
                cursor = end
            continue
        start = end = -1
        if header:
            h = text.find(header, cursor)
            if h >= 0:
                start, end = _find_content(text, content, h + len(header))
        if start < 0:
            start, end = _find_content(text, content, cursor)
        if start < 0:
            raise ChatError(f"message {i}: the chat template does not render this assistant message's content "
                            "verbatim, so its loss mask cannot be located; mark assistant output with "
                            "{% generation %} in the template")
        if start == end:  # empty content: just its end-of-turn token, the first one from here on
            found = [(text.find(t, start), -len(t), t) for t in ends if text.find(t, start) >= 0]
            if found:
                start, _, tail = min(found)
                end = start + len(tail)
        else:
            after = end + len(text[end:]) - len(text[end:].lstrip())
            tail = next((t for t in ends if text.startswith(t, after)), None)
            if tail is not None:
                end = after + len(tail)
        spans.append((start, end))
        cursor = end
    return spans
