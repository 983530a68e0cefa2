"""Prompt templates for Ditto's self-simulation, in English and Chinese (chosen by the character's language).

Three texts per language:
- the *profile* of a character (label, description, aliases, properties, introduction), shown to the
  supervision model in both stages;
- the *query-simulation* prompt: two profiles, asking for questions character A can answer but B cannot;
- the *response-simulation* system prompt: the full profile plus rules for answering in character;
The *brief intro* that replaces the profile in the SFT corpus is ``Character.brief_intro()``.
Every builder takes a ``ProfileBudget``: how much of the introduction and how many properties to show, so a
prompt can be shortened step by step until it fits the engine's context (``fit_messages``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Protocol, Sequence

Message = dict[str, str]


class CharacterLike(Protocol):
    """The fields of ``ditto_jax.data.characters.Character`` that simulation reads."""

    id: str
    label: str
    description: str
    aliases: list[str]
    claims: dict[str, str]
    lang: str
    summary: str
    wiki: str


_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s*")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (Latin and CJK end punctuation); empty pieces dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text or "") if s.strip()]


def truncate_text(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, at a sentence end when one is in the second half."""
    text = (text or "").strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    ends = [m.end() for m in re.finditer(r"[.!?。！？]", cut)]
    if ends and ends[-1] >= max_chars // 2:
        return cut[: ends[-1]].strip()
    return cut.rstrip() + "…"


def introduction(character: CharacterLike) -> str:
    """The character's introduction text: the profile article (``wiki``), else the ``summary``."""
    return (character.wiki or character.summary or "").strip()


@dataclasses.dataclass(frozen=True)
class ProfileBudget:
    """How much of a profile to show: introduction characters and number of properties (``None`` = all)."""

    intro_chars: int = 3000
    max_claims: int | None = None


def shrinking_budgets(intro_chars: int) -> Iterator[ProfileBudget]:
    """Budgets from the full one down: the introduction halved to nothing, then the properties halved to 2."""
    chars = intro_chars
    while chars >= 50:
        yield ProfileBudget(chars)
        chars //= 2
    for claims in (8, 4, 2):
        yield ProfileBudget(0, claims)


class PromptTooLong(ValueError):
    """Even the smallest profile budget gives a prompt longer than the engine allows."""


def fit_prompt(build: Callable[[ProfileBudget], list["Message"]], encode: Callable[[list["Message"]], list[int]],
               max_tokens: int, intro_chars: int) -> tuple[list[int], bool]:
    """Token ids of the largest-budget prompt with at most ``max_tokens`` tokens, and whether it was shortened."""
    for i, budget in enumerate(shrinking_budgets(intro_chars)):
        ids = encode(build(budget))
        if len(ids) <= max_tokens:
            return ids, i > 0
    raise PromptTooLong(f"prompt needs {len(ids)} tokens even with the smallest profile, limit {max_tokens}")


_PROFILE_LABELS = {
    "en": {"name": "Name", "description": "Description", "aliases": "Also known as", "claims": "Properties",
           "intro": "Introduction", "sep": ": ", "list_sep": "; ", "none": "none"},
    "zh": {"name": "姓名", "description": "描述", "aliases": "别名", "claims": "属性",
           "intro": "介绍", "sep": "：", "list_sep": "；", "none": "无"},
}


def render_profile(character: CharacterLike, lang: str, budget: ProfileBudget = ProfileBudget()) -> str:
    """The character's profile as labelled lines in ``lang``, within ``budget``."""
    t = _PROFILE_LABELS[lang]
    lines = [
        f"{t['name']}{t['sep']}{character.label}",
        f"{t['description']}{t['sep']}{character.description or t['none']}",
        f"{t['aliases']}{t['sep']}{t['list_sep'].join(character.aliases) if character.aliases else t['none']}",
        f"{t['claims']}{t['sep'].rstrip()}",
    ]
    claims = list(character.claims.items())[: budget.max_claims]
    lines += [f"- {key}{t['sep']}{value}" for key, value in claims] or [f"- {t['none']}"]
    intro = truncate_text(introduction(character), budget.intro_chars) if budget.intro_chars > 0 else ""
    if intro:
        lines.append(f"{t['intro']}{t['sep']}{intro}")
    return "\n".join(lines)


QUERY_SYSTEM = {
    "en": "You are a careful writer who designs questions for a role-play dataset. You follow the output format exactly.",
    "zh": "你是一名细心的编写者，负责为角色扮演数据集设计问题。你严格遵守输出格式。",
}

_QUERY_EN = """Below are the profiles of two characters, {a} and {b}.

[Profile of {a}]
{profile_a}

[Profile of {b}]
{profile_b}

Design {n} questions that a user might ask {a} in a casual chat, such that {a} can answer them but {b} cannot.

Requirements:
1. {a} can answer each question from their own life, work and knowledge as described above; each question fits {a}'s era, setting and world.
2. {b} could not answer them: each question lies beyond {b}'s era, world or genre, occupation, age or knowledge.
3. Speak to {a} directly in the second person ("you", "your"), casually, like a curious person chatting with them.
4. One short sentence per question; the {n} questions cover different topics.
5. Do not mention {b}, the profiles, this task, or that you are testing anyone.

Write the questions in English. Output only JSON, exactly in this form:
{example}"""

_QUERY_ZH = """以下是两个角色的资料：{a} 和 {b}。

【{a}的资料】
{profile_a}

【{b}的资料】
{profile_b}

请设计{n}个用户在闲聊中可能向{a}提出的问题，要求{a}能回答，而{b}无法回答。

要求：
1. {a}能凭借上述资料中自己的经历、工作和知识回答每个问题；问题符合{a}所处的时代、环境和世界。
2. {b}无法回答这些问题：问题超出{b}的时代、世界或题材、职业、年龄或知识范围。
3. 用第二人称（“你”“你的”）直接对{a}说话，语气轻松随意，就像一个好奇的人在和他/她聊天。
4. 每个问题一句话，简短；{n}个问题涉及不同的话题。
5. 不要提到{b}、资料、这个任务，也不要说你在测试谁。

请用中文写问题。只输出 JSON，格式严格如下：
{example}"""


def query_example(n: int, lang: str) -> str:
    """The literal JSON shape shown in the query prompt."""
    item = '{"question": "..."}'
    return "[" + ", ".join([item] * n) + "]"


def query_messages(a: CharacterLike, b: CharacterLike, n: int, lang: str,
                   budget: ProfileBudget = ProfileBudget()) -> list[Message]:
    """Chat messages asking the supervision model for ``n`` questions ``a`` can answer but ``b`` cannot."""
    template = _QUERY_ZH if lang == "zh" else _QUERY_EN
    user = template.format(
        a=a.label, b=b.label, n=n,
        profile_a=render_profile(a, lang, budget), profile_b=render_profile(b, lang, budget),
        example=query_example(n, lang),
    )
    return [{"role": "system", "content": QUERY_SYSTEM[lang]}, {"role": "user", "content": user}]


_RESPONSE_EN = """You are {name}, {description}. You stay in character as {name} for the whole conversation.

This is who you are:
{profile}

How to answer:
- Answer as {name} would, in the first person, drawing on your own life, times and knowledge above. Speak naturally in your own voice and manner.
- If a question is about something {name} could not know (events after your time, a world, technology, field or person you never encountered), do not answer it. Decline in character and say why you cannot know it, for example that it is beyond your time or your world.
- Never say or hint that you are an AI, a language model or an assistant, and never mention a profile, these instructions or a role-play.
- Do not keep repeating your own name; the user knows who you are.
- Reply in English, in a few sentences."""

_RESPONSE_ZH = """你是{name}，{description}。在整段对话中，你始终以{name}的身份说话。

这就是你：
{profile}

回答方式：
- 以{name}的身份、用第一人称回答，依据上面你自己的经历、时代和知识，用你自己的语气和风格自然地说话。
- 如果问题涉及{name}不可能知道的事情（你的时代之后的事件，你从未接触过的世界、技术、领域或人物），不要回答。以角色的口吻婉拒，并说明你为什么不可能知道，例如这超出了你的时代或你的世界。
- 绝不说出或暗示你是人工智能、语言模型或助手，也绝不提及资料、这些说明或角色扮演。
- 不要反复说自己的名字，对方知道你是谁。
- 用中文回答，几句话即可。"""


def response_system(character: CharacterLike, budget: ProfileBudget = ProfileBudget()) -> str:
    """System prompt for response simulation: full profile plus the in-character rules, in the character's language."""
    lang = character.lang
    template = _RESPONSE_ZH if lang == "zh" else _RESPONSE_EN
    desc = (character.description or "").strip().rstrip(".。") or ("一个人物" if lang == "zh" else "a character")
    return template.format(name=character.label, description=desc,
                           profile=render_profile(character, lang, budget))


def response_messages(character: CharacterLike, query: str, history: Sequence[tuple[str, str]] = (),
                      budget: ProfileBudget = ProfileBudget()) -> list[Message]:
    """Messages for one in-character answer: system (profile + rules), earlier (query, answer) pairs, the query."""
    messages: list[Message] = [{"role": "system", "content": response_system(character, budget)}]
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": query})
    return messages


def profile_texts(character: CharacterLike) -> list[str]:
    """Pieces of the profile that must never appear in an SFT system prompt: property lines (as rendered in
    either language) and introduction sentences (for checks and tests)."""
    out = [f"{k}{sep}{v}" for k, v in character.claims.items() for sep in (": ", "：")]
    out += [s for s in split_sentences(introduction(character)) if len(s) >= 20]
    return out


def as_dict(character: Any) -> dict[str, Any]:
    """A small, JSON-safe view of a character for reports."""
    return {"id": character.id, "label": character.label, "lang": character.lang}
