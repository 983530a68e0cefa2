"""The LLM judge: prompts (English and Chinese, by the session's language), output constraints and parsers.

Four questions are asked of the judge, one turn (user query + role's answer) at a time, as in WikiRoleEval:

* ``consistency``: which of the candidate roles (true role + distractors, each "name — first sentence of its
  description", lettered A, B, ...) is speaking? Output: one letter.
* ``knowledge``: given the role's summary and the turn's evidence, how accurate and knowledgeable is the answer,
  1-10? Output: an integer.
* ``rejection``: did the role refuse to answer (lack of knowledge or any other reason)? Output: 1 or 0.
* ``mtbench``: MT-Bench single-answer grading of turn 1 or turn 2 (the judge sees the whole conversation and rates
  the answer to the last question), 1-10.

Decoding is constrained (``judge_constraint``) so a finished output is exactly a letter / integer / 0-1. Parsers
also accept the free-text forms an unconstrained judge tends to write ("Answer: B", "Score: 7", "[[7]]") and return
``None`` otherwise; the caller counts every ``None`` (nothing is dropped silently).
The wording is ours, modelled on the paper's released judge prompts (which ask for the same three judgements).
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal, Mapping, Sequence

Metric = Literal["consistency", "knowledge", "rejection", "mtbench"]
METRICS: tuple[str, ...] = ("consistency", "knowledge", "rejection")
Message = dict[str, str]
LETTERS = string.ascii_uppercase

SCORE_RANGE = (1, 10)

_SYSTEM = {
    "en": "You are a strict, impartial evaluator of role-play conversations. Reply only in the requested format.",
    "zh": "你是一名严格、公正的角色扮演对话评审。只按要求的格式回答。",
}

_CONSISTENCY = {
    "en": (
        "Below is one exchange between a user and a character played by an AI. The user's message is marked "
        "[Question] and the character's reply is marked [Reply].\n\n[Question]\n{query}\n\n[Reply]\n{answer}\n\n"
        "Which of these identities is the character who wrote the reply?\n{options}\n\n"
        "Judge from what the reply says and how it says it: knowledge, era, experiences, voice. "
        "Answer with the letter of the single best match ({letters}) and nothing else."
    ),
    "zh": (
        "下面是用户与一个由AI扮演的角色之间的一轮对话。用户的话标为[问题]，角色的回复标为[回复]。\n\n"
        "[问题]\n{query}\n\n[回复]\n{answer}\n\n写出这段回复的角色是以下哪一个身份？\n{options}\n\n"
        "请根据回复的内容和语气（知识、时代、经历、说话方式）判断，只回答最符合的选项字母（{letters}），不要输出其他内容。"
    ),
}

_KNOWLEDGE = {
    "en": (
        "An AI is playing the role of {label}. About {label}: {summary}\n\n"
        "Rate how accurate the character's reply is: does it use knowledge consistent with the reference facts "
        "below, without factual errors or invented details? Facts the role could not know must not be claimed.\n\n"
        "[Question]\n{query}\n\n[Reply]\n{answer}\n\n[Reference facts]\n{evidence}\n\n"
        "Give a score from 1 (wrong or empty) to 10 (accurate and rich in the role's own knowledge). "
        "Answer with the number only."
    ),
    "zh": (
        "一个AI正在扮演{label}。{label}的简介：{summary}\n\n"
        "请评价角色回复的准确性：回复中的知识是否与下面的参考事实一致，有没有事实错误或编造的细节？"
        "角色不可能知道的事情不应当被说成知道。\n\n[问题]\n{query}\n\n[回复]\n{answer}\n\n[参考事实]\n{evidence}\n\n"
        "请给出1（错误或空洞）到10（准确且充分体现该角色自身知识）之间的分数，只回答数字。"
    ),
}

_NO_EVIDENCE = {"en": "(none for this question)", "zh": "（本题没有参考事实）"}

_REJECTION = {
    "en": (
        "Below is one exchange between a user and the character {label}, played by an AI.\n\n"
        "[Question]\n{query}\n\n[Reply]\n{answer}\n\n"
        "Does the character decline to answer the question, for example because it lies outside what the "
        "character could know (era, age, occupation, world) or for any other reason? "
        "Answer 1 if the character refuses or says it cannot answer, 0 if it answers. Reply with 1 or 0 only."
    ),
    "zh": (
        "下面是用户与由AI扮演的角色{label}之间的一轮对话。\n\n[问题]\n{query}\n\n[回复]\n{answer}\n\n"
        "角色是否拒绝回答这个问题（例如问题超出了角色所处的时代、年龄、职业或世界的认知范围，或其他原因）？"
        "如果角色拒绝回答或表示无法回答，回答1；如果角色作答了，回答0。只回答1或0。"
    ),
}

_MTBENCH = {
    "en": (
        "Act as an impartial judge of the quality of an AI assistant's answer{focus}. Consider helpfulness, "
        "relevance, accuracy, depth, creativity and how well it stays in the requested role.\n\n{dialogue}\n\n"
        "Rate the answer{focus} on a scale of 1 to 10. Answer with the number only."
    ),
    "zh": (
        "请作为公正的评委，评价AI助手回答{focus}的质量，考虑有用性、相关性、准确性、深度、创造性以及是否始终保持所要求的角色。"
        "\n\n{dialogue}\n\n请用1到10分给该回答{focus}打分，只回答数字。"
    ),
}
_MTBENCH_FOCUS = {"en": (" to the user's question", " to the user's second question"),
                  "zh": ("", "（针对用户的第二个问题）")}
_MTBENCH_TAGS = {"en": ("User", "Assistant"), "zh": ("用户", "助手")}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def text_lang(text: str) -> str:
    """``"zh"`` when the text contains CJK characters, else ``"en"`` (MT-Bench questions carry no language)."""
    return "zh" if _CJK.search(text) else "en"


def first_sentence(text: str) -> str:
    """The first sentence of a description (up to and including ., 。, !, ?, ！ or ？)."""
    text = " ".join(text.split())
    match = re.search(r"(.+?(?:[。！？]|[.!?](?=\s|$)))", text)
    return (match.group(1) if match else text).strip()


def clip(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= max_chars else text[: max(max_chars - 1, 0)].rstrip() + "…"


def option_lines(options: Sequence[str]) -> str:
    """``A. first\\nB. second ...``."""
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(options)}")
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def _messages(lang: str, prompt: str) -> list[Message]:
    return [{"role": "system", "content": _SYSTEM[lang]}, {"role": "user", "content": prompt}]


def consistency_messages(lang: str, query: str, answer: str, options: Sequence[str]) -> list[Message]:
    """Multiple choice: which of ``options`` (already formatted "name — description") wrote ``answer``."""
    letters = ", ".join(LETTERS[: len(options)])
    return _messages(lang, _CONSISTENCY[lang].format(query=query, answer=answer, options=option_lines(options),
                                                     letters=letters))


def knowledge_messages(lang: str, label: str, summary: str, evidence: Sequence[str], query: str,
                       answer: str) -> list[Message]:
    """1-10 knowledge score with the role's summary and the turn's evidence as reference."""
    ev = "\n".join(f"- {e}" for e in evidence) if evidence else _NO_EVIDENCE[lang]
    return _messages(lang, _KNOWLEDGE[lang].format(label=label, summary=summary or "-", evidence=ev, query=query,
                                                   answer=answer))


def rejection_messages(lang: str, label: str, query: str, answer: str) -> list[Message]:
    """0/1: did the role refuse."""
    return _messages(lang, _REJECTION[lang].format(label=label, query=query, answer=answer))


def mtbench_messages(questions: Sequence[str], answers: Sequence[str], turn: int) -> list[Message]:
    """Single-answer grading of ``answers[turn]`` (turn 0 or 1), showing the dialogue up to that turn."""
    lang = text_lang(questions[0])
    user, assistant = _MTBENCH_TAGS[lang]
    parts = []
    for i in range(turn + 1):
        parts.append(f"[{user}]\n{questions[i]}\n\n[{assistant}]\n{answers[i]}")
    return _messages(lang, _MTBENCH[lang].format(focus=_MTBENCH_FOCUS[lang][min(turn, 1)], dialogue="\n\n".join(parts)))


# ------------------------------------------------------------------------------------------------------------
# output formats: constraints and parsers
# ------------------------------------------------------------------------------------------------------------
def output_pattern(metric: str, num_options: int = 4) -> str:
    """The regex a judge output must match for ``metric``."""
    if metric == "consistency":
        return "(" + "|".join(LETTERS[:num_options]) + ")"
    if metric == "rejection":
        return "(0|1)"
    lo, hi = SCORE_RANGE
    return "(" + "|".join(str(i) for i in range(hi, lo - 1, -1)) + ")"


def judge_constraint(metric: str, tokenizer: Any, vocab_size: int, num_options: int = 4) -> Any:
    """The decoding constraint for ``metric`` (a ``ditto_jax.sampling`` constraint over the judge's vocabulary)."""
    from ditto_jax.sampling import regex_constraint

    return regex_constraint(output_pattern(metric, num_options), tokenizer, vocab_size)


def parse_choice(text: str, num_options: int) -> int | None:
    """Index of the chosen option: ``"B"``, ``"(B)"``, ``"B."``, ``"Answer: B"``, ``"答案：B"``; else ``None``."""
    allowed = LETTERS[:num_options]
    stripped = text.strip()
    match = re.fullmatch(r"[\(\[]?([A-Z])[\)\]]?[.:。]?", stripped)
    if match is None:
        match = re.search(r"(?:answer|choice|option|答案|选项|选择)\s*(?:is|为|是)?\s*[:：]?\s*[\(\[]?([A-Z])\b", stripped,
                          re.IGNORECASE)
    if match is None:
        return None
    letter = match.group(1)
    return allowed.index(letter) if letter in allowed else None


def parse_score(text: str, low: int = SCORE_RANGE[0], high: int = SCORE_RANGE[1]) -> int | None:
    """An integer score in ``[low, high]``: the whole output, ``[[7]]``, ``Score: 7``, or a last line that is a
    number; else ``None`` (out-of-range numbers are ``None`` too)."""
    stripped = text.strip()
    candidates = [
        re.fullmatch(r"(\d+)", stripped),
        re.search(r"\[\[(\d+)\]\]", stripped),
        re.search(r"(?:score|rating|评分|分数)\s*[:：]?\s*(\d+)", stripped, re.IGNORECASE),
        re.fullmatch(r"(\d+)", stripped.splitlines()[-1].strip()) if stripped else None,
    ]
    for match in candidates:
        if match is not None:
            value = int(match.group(1))
            return value if low <= value <= high else None
    return None


def parse_binary(text: str) -> int | None:
    """``0`` or ``1`` (the whole output, as the paper's parser requires); else ``None``."""
    stripped = text.strip()
    return int(stripped) if stripped in ("0", "1") else None


def parse_output(metric: str, text: str | None, num_options: int = 4) -> int | None:
    """Parse a judge output for ``metric``: option index, score or 0/1 (``None`` when unparsable)."""
    if text is None:
        return None
    if metric == "consistency":
        return parse_choice(text, num_options)
    if metric == "rejection":
        return parse_binary(text)
    if metric in ("knowledge", "mtbench"):
        return parse_score(text)
    raise ValueError(f"unknown metric {metric!r}")


def option_text(label: str, description: str | None) -> str:
    """One multiple-choice option: the name and the first sentence of its description (when known)."""
    if not description:
        return label
    sep = "：" if text_lang(label + description) == "zh" else " — "
    return f"{label}{sep}{first_sentence(description)}"


def descriptions_by_label(characters: Sequence[Any]) -> Mapping[str, str]:
    """``label or alias -> description`` from knowledge-base records (first record wins on clashes)."""
    out: dict[str, str] = {}
    for c in characters:
        for name in (c.label, *c.aliases):
            out.setdefault(name, c.description)
    return out
