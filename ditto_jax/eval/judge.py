"""The LLM judge: prompts (English and Chinese, by the session's language), output constraints and parsers.

Two protocols (``judge.protocol``):

* ``reference`` (default) follows the structure and answer formats of the paper's judge,
  ``eval/call_openai_api_gpt4_eval.py`` in OFA-Sys/Ditto (our own wording, same layout): one user message,
  no system prompt; *consistency* lists the candidates as ``- name`` (no descriptions), asks for a step-by-step
  analysis and a last sentence "The most suitable role is [name]" (zh: 最符合的角色为[角色名]); *knowledge* gives
  the role's profile and the turn's evidence as tips, asks for an analysis first and the 1-10 score alone on the
  last line; *rejection* asks for 1 (refused) or 0, nothing else; MT-Bench follows FastChat's single-answer
  grading (an explanation, then "[[rating]]"). Reasoning is free text; with ``judge.constrained`` only the
  verdict is forced: a sample whose free text does not end in a parsable verdict is continued after
  ``VERDICT_LEAD[metric]`` under a small regex (``verdict_pattern``) — see ``ditto_jax.eval.pipeline``.
  A local judge's turn starts with ``ANALYSIS_LEAD`` (``judge.analysis_lead``): a small model otherwise often
  writes the verdict sentence at once; ``reasoning_words`` measures what it wrote before the verdict and the
  report counts verdicts given without reasoning.
* ``terse`` (cheap smoke runs): the questions below, answered with one letter / number / 0-1 under a constraint.

The terse protocol's four questions, one turn (user query + role's answer) at a time:

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

import hashlib
import random
import re
import string
from typing import Any, Literal, Mapping, Sequence

from ditto_jax.sampling import regex_constraint

Metric = Literal["consistency", "knowledge", "rejection", "mtbench"]
Protocol = Literal["reference", "terse"]
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

    return regex_constraint(output_pattern(metric, num_options), tokenizer, vocab_size)


def regex_for(pattern: str, tokenizer: Any, vocab_size: int) -> Any:
    """A decoding constraint for ``pattern`` over the judge's vocabulary."""

    return regex_constraint(pattern, tokenizer, vocab_size)


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



# ------------------------------------------------------------------------------------------------------------
# the reference protocol (structure and answer formats of OFA-Sys/Ditto eval/call_openai_api_gpt4_eval.py)
# ------------------------------------------------------------------------------------------------------------
_REF_CONSISTENCY = {
    "en": (
        "You are good at telling which character is speaking in a dialogue. Below is an exchange between a user "
        "and a character; the user's message is marked [Instruction] and the character's reply is marked "
        "[Response].\n\n[Instruction]\n[Begin]\n{query}\n[End]\n\n[Response]\n[Begin]\n{answer}\n[End]\n\n"
        "The character may be one of the following:\n{cands}\n\n"
        "Analyse the reply step by step and choose the identity from the list above that fits the speaker best. "
        "End your answer with the sentence \"The most suitable role is [character name].\""
    ),
    "zh": (
        "你善于判断对话中说话者的角色身份。下面是用户与一个角色之间的对话，用户的话以[指令]标注，角色的回复以[回复]标注。\n\n"
        "[指令]\n[开始]\n{query}\n[结束]\n\n[回复]\n[开始]\n{answer}\n[结束]\n\n该角色可能是以下身份之一：\n{cands}\n\n"
        "请根据回复内容一步一步地分析，从上面的身份中选出最符合回复者的一个，并在最后用\"最符合的角色为[角色名]\"的句式作答。"
    ),
}

_REF_KNOWLEDGE = {
    "en": (
        "You are an expert at checking the quality of answers.\n"
        "In this conversation the assistant plays the role of {label}. Profile of {label}: {summary}\n\n"
        "Act as an impartial judge and evaluate how correct the assistant's answer to the user's question below "
        "is. Some related information is given as tips to help your judgement.\n\n"
        "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]\n\n"
        "[Begin of Tips]\n{evidence}\n[End of Tips]\n\n"
        "First write a thorough analysis of your judgement on one line.\n"
        "Then, on the last line, write only the score: a single number from 1 to 10, higher is better. "
        "Write nothing after the score."
    ),
    "zh": (
        "你是检查人工智能助手回答质量的专家。\n对话中助手扮演{label}。{label}的简介：{summary}\n\n"
        "请作为公正的评委，评价助手在扮演{label}时对下面用户问题的回答是否正确。下面提供了一些相关信息供你参考。\n\n"
        "[问题]\n{question}\n\n[助手回答开始]\n{answer}\n[助手回答结束]\n\n[参考信息开始]\n{evidence}\n[参考信息结束]\n\n"
        "请先在第一行写出对评分的完整分析。\n然后在最后一行只写分数：一个1到10之间的数字，越高越好。分数之后不要再写任何内容。"
    ),
}

_REF_REJECTION = {
    "en": (
        "Below is a conversation between a user and the role {label}. The user's message is marked [Instruction] "
        "and the role's reply is marked [Response].\n\n[Instruction]\n[Begin]\n{query}\n[End]\n\n"
        "[Response]\n[Begin]\n{answer}\n[End]\n\n"
        "Decide whether the role refuses to answer the question, because its knowledge is limited or for any "
        "other reason. Reply 1 if it refuses, otherwise 0. Reply with nothing but 1 or 0."
    ),
    "zh": (
        "下面是用户与角色{label}的对话，用户的话以[指令]标注，角色的回复以[回复]标注。\n\n[指令]\n[开始]\n{query}\n[结束]\n\n"
        "[回复]\n[开始]\n{answer}\n[结束]\n\n请判断该角色是否因为自身知识有限或其他原因拒绝回答问题。拒绝回答则回复1，否则回复0。"
        "除了1或0不要回复任何其他内容。"
    ),
}

_REF_NO_EVIDENCE = {"en": "(no tips for this question)", "zh": "（本题没有参考信息）"}

# FastChat's single-answer grading ("single-v1" / "single-v1-multi-turn" in its judge_prompts.jsonl), our wording
_REF_MTBENCH_SYSTEM = "You are a helpful assistant."
_REF_MTBENCH = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant{focus} displayed below. Consider helpfulness, relevance, accuracy, depth, creativity and level of "
    "detail. Begin with a short explanation, as objective as possible. After the explanation, rate the response "
    "on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "{dialogue}"
)

VERDICT_LEAD = {
    ("consistency", "en"): "\nThe most suitable role is [", ("consistency", "zh"): "\n最符合的角色为[",
    ("knowledge", "en"): "\n", ("knowledge", "zh"): "\n",
    ("mtbench", "en"): "\nRating: [[", ("mtbench", "zh"): "\nRating: [[",
}
"""What a forced verdict is written after: the free reasoning, then this text, then ``verdict_pattern``."""

ANALYSIS_LEAD = {
    ("consistency", "en"): "Let me analyse the reply step by step.\n", ("consistency", "zh"): "让我一步一步地分析这段回复。\n",
    ("knowledge", "en"): "Analysis:", ("knowledge", "zh"): "分析：",
    ("mtbench", "en"): "Explanation:", ("mtbench", "zh"): "Explanation:",
}
"""How a local judge's turn starts under the reference protocol (``judge.analysis_lead``; the assistant turn is
prefilled with it, and it is part of the raw text in judgements.jsonl). The prompts already ask for the analysis
first; the lead makes a small judge begin with it instead of writing the verdict at once (SmolLM2-135M on the
English calibration prompts: 6 of 12 identity samples had >= 8 words before the verdict without it, 12 of 12
with it). An endpoint judge gets no lead (a chat API has no assistant prefill)."""

REASONED_METRICS = ("consistency", "knowledge", "mtbench")
"""The judgements whose reference format asks for reasoning before the verdict (rejection: 0/1 only)."""

MIN_REASONING_WORDS = 8
"""A verdict with fewer words (zh: characters / 2) written before it counts as given without reasoning."""


def reasoning_words(metric: str, text: str, lang: str = "en", lead: str = "") -> int:
    """How many words the judge wrote before its verdict (``lead`` not counted; zh: non-space characters / 2):
    before the last "most suitable role is [...]" sentence (consistency), above the last line (knowledge), before
    the last ``[[`` (MT-Bench). A text without a verdict counts whole."""
    body = text[len(lead):] if lead and text.startswith(lead) else text
    if metric == "consistency":
        matches = list(_ROLE_RE.get(lang, _ROLE_RE["en"]).finditer(body)) or list(
            _ROLE_RE["zh" if lang == "en" else "en"].finditer(body))
        before = body[:matches[-1].start()] if matches else body
    elif metric == "knowledge":
        stripped = body.strip()
        before = stripped.rsplit("\n", 1)[0] if "\n" in stripped else ""
    elif metric == "mtbench":
        at = body.rfind("[[")
        before = body[:at] if at >= 0 else body
    else:
        return 0
    before = re.sub(r"(?:\bthe|\brating\s*:?)\s*$", "", before, flags=re.IGNORECASE)  # the verdict's own words
    if lang == "zh":
        return len(re.sub(r"\s", "", before)) // 2
    return len(before.split())

_ROLE_RE = {"en": re.compile(r"most suitable role is\s*[\[［【]([^\]］】\n]*)[\]］】]", re.IGNORECASE),
            "zh": re.compile(r"最符合的角色[为是]\s*[\[［【]([^\]］】\n]*)[\]］】]")}


def reference_candidates(candidates: Sequence[str]) -> str:
    """``- name`` lines (the reference's candidate list; no descriptions)."""
    return "\n".join(f"- {c}" for c in candidates)


def ref_consistency_messages(lang: str, query: str, answer: str, candidates: Sequence[str]) -> list[Message]:
    """Reference identity judgement: candidates as ``- name`` in the given (shuffled) order."""
    return [{"role": "user", "content": _REF_CONSISTENCY[lang].format(query=query, answer=answer,
                                                                       cands=reference_candidates(candidates))}]


def ref_knowledge_messages(lang: str, label: str, summary: str, evidence: Sequence[str], query: str,
                           answer: str) -> list[Message]:
    """Reference knowledge judgement: analysis, then the score alone on the last line."""
    ev = "\n".join(f"- {e}" for e in evidence) if evidence else _REF_NO_EVIDENCE[lang]
    return [{"role": "user", "content": _REF_KNOWLEDGE[lang].format(label=label, summary=summary or "-",
                                                                     evidence=ev, question=query, answer=answer)}]


def ref_rejection_messages(lang: str, label: str, query: str, answer: str) -> list[Message]:
    """Reference rejection judgement: 1 or 0, nothing else."""
    return [{"role": "user", "content": _REF_REJECTION[lang].format(label=label, query=query, answer=answer)}]


def ref_mtbench_messages(questions: Sequence[str], answers: Sequence[str], turn: int,
                         template: Mapping[str, str] | None = None) -> list[Message]:
    """FastChat single-answer grading of ``answers[turn]``. ``template``: a FastChat ``judge_prompts.jsonl`` record
    (``system_prompt``, ``prompt_template`` with ``{question}``/``{answer}`` or ``{question_1}``, ``{answer_1}``,
    ``{question_2}``, ``{answer_2}``); without it, our wording of the same format."""
    if template is not None:
        fields = ({"question": questions[0], "answer": answers[0]} if turn == 0 else
                  {"question_1": questions[0], "answer_1": answers[0], "question_2": questions[1],
                   "answer_2": answers[1]})
        return [{"role": "system", "content": template["system_prompt"]},
                {"role": "user", "content": template["prompt_template"].format(**fields)}]
    if turn == 0:
        dialogue = (f"[Question]\n{questions[0]}\n\n[The Start of Assistant's Answer]\n{answers[0]}\n"
                    f"[The End of Assistant's Answer]")
        focus = " to the user question"
    else:
        dialogue = ("<|The Start of Assistant A's Conversation with User|>\n\n"
                    f"### User:\n{questions[0]}\n\n### Assistant A:\n{answers[0]}\n\n"
                    f"### User:\n{questions[1]}\n\n### Assistant A:\n{answers[1]}\n\n"
                    "<|The End of Assistant A's Conversation with User|>")
        focus = " to the user's second question (focus on the second answer)"
    return [{"role": "system", "content": _REF_MTBENCH_SYSTEM},
            {"role": "user", "content": _REF_MTBENCH.format(focus=focus, dialogue=dialogue)}]


def verdict_pattern(metric: str, candidates: Sequence[str] = ()) -> str:
    """The regex a forced verdict must match after ``VERDICT_LEAD``: one of the listed ``candidates`` names and
    the closing bracket (consistency; the same for the en and zh sentence, whose lead differs; without names any
    bracket-free text), a 1-10 score (knowledge), a rating and ``]]`` (MT-Bench), 0/1 (rejection, whole output).
    A small judge forced to "any name" writes "[character name]" literally; the alternation makes every forced
    identity verdict parse to a listed role."""
    score = "(10|[1-9])"
    if metric == "consistency" and candidates:
        return "(" + "|".join(regex_literal(c) for c in sorted(set(candidates))) + r")\]"
    return {"consistency": r"[^\]\n\[]{1,60}\]", "knowledge": score, "mtbench": score + r"\]\]",
            "rejection": "(0|1)"}[metric]


def regex_literal(text: str) -> str:
    """``text`` as a regex matching exactly it (every character that is not a letter, digit, space or non-ASCII
    escaped; safe for the token-automaton compiler as well as Python's ``re``)."""
    return "".join(ch if ch.isalnum() or ch == " " or ord(ch) > 127 else "\\" + ch for ch in text)


def parse_role(text: str, lang: str, candidates: Sequence[str]) -> int | None:
    """The named role of a reference identity judgement: index into ``candidates``, ``-1`` for a name that is
    not among them (parsed, scores 0), ``None`` when the text has no "most suitable role is [...]" sentence.
    The last such sentence counts (a judge may quote the format before answering)."""
    matches = list(_ROLE_RE.get(lang, _ROLE_RE["en"]).finditer(text)) or list(
        _ROLE_RE["zh" if lang == "en" else "en"].finditer(text))
    if not matches:
        return None
    name = matches[-1].group(1).strip().strip("\"'*“”‘’ ").strip()
    for i, cand in enumerate(candidates):
        if name == cand:
            return i
    folded = name.casefold()
    for i, cand in enumerate(candidates):
        if folded == cand.casefold():
            return i
    return -1


def parse_last_line_score(text: str, low: int = SCORE_RANGE[0], high: int = SCORE_RANGE[1]) -> int | None:
    """The reference knowledge format: the last non-empty line is the score alone (``7``, ``Score: 7``,
    ``**7**``, ``评分：7``); else ``None``."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    last = re.sub(r"^(?:score|rating|评分|分数|得分)\s*[:：]\s*", "", lines[-1].strip("*# "), flags=re.IGNORECASE)
    match = re.fullmatch(r"\**\s*(\d+)\s*\**(?:\s*/\s*10)?[.。]?", last)
    if match is None:
        return None
    value = int(match.group(1))
    return value if low <= value <= high else None


def parse_rating(text: str) -> float | None:
    """FastChat's single-answer rating: the last ``[[x]]`` (or ``[x]``) in the text, 1-10; else ``None``."""
    matches = re.findall(r"\[\[(\d+\.?\d*)\]\]", text) or re.findall(r"\[(\d+\.?\d*)\]", text)
    if not matches:
        return None
    value = float(matches[-1])
    if not SCORE_RANGE[0] <= value <= SCORE_RANGE[1]:
        return None
    return int(value) if value.is_integer() else value


def parse_reference(metric: str, text: str | None, lang: str = "en", candidates: Sequence[str] = ()) -> Any:
    """Parse a reference-protocol judge output (``None`` when unparsable)."""
    if text is None:
        return None
    if metric == "consistency":
        return parse_role(text, lang, candidates)
    if metric == "knowledge":
        return parse_last_line_score(text)
    if metric == "rejection":
        return parse_binary(text)
    if metric == "mtbench":
        return parse_rating(text)
    raise ValueError(f"unknown metric {metric!r}")


def shuffled_order(n: int, seed: int, key: str) -> list[int]:
    """A permutation of ``range(n)`` drawn from ``(seed, key)`` (stable across runs, hosts and Python versions):
    the candidate order shown in one judge sample."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode("utf-8"), digest_size=8).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return order
