"""Chat formats (ChatML as in Qwen2, Llama-3 headers): messages -> parts with a train flag, and the Jinja
template string that renders the same text in transformers' ``apply_chat_template``.

A conversation is rendered into ``ChatPart``s: plain text, or a special token (rendered as its literal text,
encoded to its id). ``train`` is True exactly on assistant content and the assistant's end-of-turn token, so a
tokenizer can turn parts into ``(ids, loss_mask)`` while producing the same ids as tokenizing the whole
rendered string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

ChatFormat = Literal["chatml", "llama3"]
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
