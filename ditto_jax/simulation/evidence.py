"""Evidence for knowledge judging: the profile facts a query draws on, by lexical overlap.

Facts of a character are its properties as ``"property: value"`` lines, then the sentences of its introduction
(``wiki``, else ``summary``) and its description. A query's evidence is the ``k`` facts sharing the most
content tokens with it (English words of 3+ letters that are not stop words, lower-cased; CJK character bigrams),
ties kept in profile order. For a contrastive query the facts come from the partner who can answer it — they
show what the question is about and why it lies outside the character's knowledge. When nothing overlaps, the
character's description stands in so every user turn carries evidence.
"""

from __future__ import annotations

import re
from typing import Any

from ditto_jax.simulation.prompts import introduction, split_sentences

_WORD = re.compile(r"[A-Za-z\u00c0-\u024f][A-Za-z\u00c0-\u024f'\-]+")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_STOP = frozenset(
    "the and for you your yours are was were with what when where which who whom why how that this these those "
    "from have has had did does not but can could would should will shall about into over than then them they "
    "their there here very much many some any all our ours his her hers its it's i'm you're do be been being "
    "ever also just like more most one ones out own such too off only other".split())
_ZH_STOP = frozenset("你的 什么 怎么 为什 么样 是否 有没 没有 一个 这个 那个 你们 我们 他们 如何 哪些 时候 可以".split())


def content_tokens(text: str) -> set[str]:
    """Content tokens of ``text``: lower-cased words (3+ letters, no stop words) and CJK character bigrams."""
    words = {w.lower().strip("'-") for w in _WORD.findall(text)}
    tokens = {w for w in words if len(w) >= 3 and w not in _STOP}
    for run in _CJK_RUN.findall(text):
        tokens |= {run[i : i + 2] for i in range(len(run) - 1)} - _ZH_STOP
        if len(run) == 1:
            tokens.add(run)
    return tokens


def character_facts(character: Any) -> list[str]:
    """The character's facts in profile order: properties, introduction sentences, description."""
    sep = "：" if character.lang == "zh" else ": "
    facts = [f"{k}{sep}{v}" for k, v in character.claims.items()]
    facts += split_sentences(introduction(character))
    if character.description:
        facts.append(character.description.strip())
    seen: set[str] = set()
    return [f for f in facts if not (f in seen or seen.add(f))]


def select_evidence(query: str, character: Any, k: int) -> list[str]:
    """The ``k`` facts of ``character`` with the largest overlap with ``query`` (description when none overlap)."""
    if k <= 0:
        return []
    q = content_tokens(query)
    scored = [(len(q & content_tokens(f)), -i, f) for i, f in enumerate(character_facts(character))]
    best = [f for score, _, f in sorted(scored, reverse=True)[:k] if score > 0]
    if not best and character.description:
        best = [character.description.strip()]
    return best
