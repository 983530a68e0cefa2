"""Quality filters for simulated queries and answers; each returns the reason a text is dropped, or ``None``.

Reasons (the report counts each): ``format`` (query output never parsed), ``prompt_too_long`` (even the
smallest profile does not fit the engine's context), ``too_short`` (empty or below the
minimum), ``duplicate`` (same normalised query already in the session), ``character_break`` (assistant talk or
talk about the profile, English and Chinese), ``wrong_language`` (too few letters in the session's script),
``over_long`` (cut by ``max_new_tokens`` or longer than the maximum), ``endpoint_error`` (an endpoint supervision
model failed the request after its retries).
"""

from __future__ import annotations

import collections
import re
import unicodedata

from ditto_jax.simulation.config import FiltersConfig

REASONS = ("format", "prompt_too_long", "too_short", "duplicate", "character_break", "wrong_language", "over_long",
           "endpoint_error")

# Latin-letter lookarounds instead of \b: in Chinese text an English word touches CJK characters, which \b
# counts as word characters.
_BREAK_EN = re.compile(
    r"(?<![A-Za-z])(as an? (ai|artificial intelligence|language model|assistant|llm)(?![A-Za-z])|i am an? (ai|artificial intelligence|"
    r"language model|assistant)(?![A-Za-z])|i'm an? (ai|language model|assistant)(?![A-Za-z])|language model|ai assistant|"
    r"large language model|openai|chatgpt|role-?play(ing)?(?![A-Za-z])|profiles?(?![A-Za-z])|these instructions(?![A-Za-z])|"
    r"the instructions above|system prompt)",
    re.IGNORECASE,
)
_BREAK_ZH = re.compile(
    r"(作为一?个?(人工智能|AI|ai|语言模型|助手)|我是一?个?(人工智能|AI|ai|语言模型|助手)|语言模型|人工智能助手|AI助手|"
    r"个人资料|人物资料|角色资料|资料中|资料里|根据资料|简介中|根据简介|档案中|人设|角色设定|角色扮演|设定中)"
)

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def character_break(text: str) -> bool:
    """True when the text steps out of the role (AI/assistant talk, mentions of the profile or instructions)."""
    return bool(_BREAK_EN.search(text) or _BREAK_ZH.search(text))


def script_ratio(text: str, lang: str) -> float:
    """Share of letters written in ``lang``'s script among CJK + Latin letters (0.0 when there are none)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    total = cjk + latin
    if total == 0:
        return 0.0
    return (cjk if lang == "zh" else latin) / total


def normalize_query(text: str) -> str:
    """Case-, width-, space- and punctuation-insensitive form of a query (for duplicate detection)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def check_query(text: str, lang: str, cfg: FiltersConfig, seen: set[str]) -> str | None:
    """Reason to drop a simulated query (``seen`` holds the session's normalised queries and is updated)."""
    if len(text.strip()) < max(cfg.min_query_chars, 1):
        return "too_short"
    if cfg.character_breaks and character_break(text):
        return "character_break"
    if cfg.language and script_ratio(text, lang) < cfg.min_language_ratio:
        return "wrong_language"
    norm = normalize_query(text)
    if cfg.dedupe_queries and norm in seen:
        return "duplicate"
    seen.add(norm)
    return None


def check_response(text: str, lang: str, finish_reason: str, cfg: FiltersConfig) -> str | None:
    """Reason to drop a simulated answer, or ``None`` to keep it."""
    stripped = text.strip()
    if len(stripped) < max(cfg.min_response_chars, 1):
        return "too_short"
    if (cfg.drop_truncated and finish_reason == "length") or len(stripped) > cfg.max_response_chars:
        return "over_long"
    if cfg.character_breaks and character_break(stripped):
        return "character_break"
    if cfg.language and script_ratio(stripped, lang) < cfg.min_language_ratio:
        return "wrong_language"
    return None


class FilterCounts:
    """Kept/dropped counts per stage and reason, in a fixed order for the report."""

    def __init__(self) -> None:
        self._counts: dict[str, collections.Counter[str]] = {}

    def add(self, stage: str, reason: str | None) -> None:
        """Count one item of ``stage``: kept when ``reason`` is ``None``, else dropped for ``reason``."""
        if reason is not None and reason not in REASONS:
            raise ValueError(f"unknown filter reason {reason!r}")
        self._counts.setdefault(stage, collections.Counter())["kept" if reason is None else reason] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{stage: {"kept": n, reason: n, ...}}`` with every reason present."""
        return {
            stage: {"kept": c["kept"], **{r: c[r] for r in REASONS}, "total": sum(c.values())}
            for stage, c in self._counts.items()
        }
