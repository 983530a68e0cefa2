"""Simulation filters: character breaks, language, duplicates, lengths, counting."""

from __future__ import annotations

import pytest

from ditto_jax.simulation.config import FiltersConfig
from ditto_jax.simulation.filters import (
    REASONS,
    FilterCounts,
    character_break,
    check_query,
    check_response,
    normalize_query,
    script_ratio,
)


@pytest.mark.parametrize("text", [
    "As an AI language model, I cannot answer that.",
    "I am an AI assistant and do not have memories.",
    "According to my profile, I was born in Athens.",
    "The profile says nothing about that.",
    "These instructions tell me to stay in character.",
    "作为一个人工智能，我无法回答。",
    "我只是roleplay里的角色。",
    "根据资料，我出生在鲁国。",
    "我只是一个语言模型。",
    "这在我的人设里没有提到。",
])
def test_character_breaks_detected(text):
    assert character_break(text)


@pytest.mark.parametrize("text", [
    "I was born in Athens, and I never wrote a word of philosophy down.",
    "Steam engines? I know nothing of such machines; they lie beyond my time.",
    "I gave my instructions to the archers before Crécy.",
    "我生在鲁国陬邑，少年时做过小吏。",
    "你说的那种机器，朕从未听闻，那已超出朕的时代。",
])
def test_in_character_text_kept(text):
    assert not character_break(text)


def test_script_ratio():
    assert script_ratio("Hello there", "en") == 1.0
    assert script_ratio("你好", "zh") == 1.0
    assert script_ratio("你好", "en") == 0.0
    assert script_ratio("12345 !!", "en") == 0.0
    assert script_ratio("我读过Plato", "zh") == pytest.approx(3 / 8)


def test_check_query_reasons_and_duplicates():
    cfg = FiltersConfig(min_query_chars=5)
    seen: set[str] = set()
    assert check_query("Where were you born?", "en", cfg, seen) is None
    assert check_query("where  were you BORN", "en", cfg, seen) == "duplicate"
    assert check_query("Hi?", "en", cfg, seen) == "too_short"
    assert check_query("What does your profile say?", "en", cfg, seen) == "character_break"
    assert check_query("你在哪里出生的？", "en", cfg, seen) == "wrong_language"
    assert check_query("你在哪里出生的？", "zh", cfg, seen) is None
    assert normalize_query("Ｗhere, were YOU born?") == normalize_query("where were you born")
    loose = FiltersConfig(dedupe_queries=False, language=False)
    assert check_query("你在哪里出生的？", "en", loose, set()) is None


def test_check_response_reasons():
    cfg = FiltersConfig(min_response_chars=10, max_response_chars=100)
    assert check_response("I was born in Athens, friend.", "en", "stop", cfg) is None
    assert check_response("   ", "en", "stop", cfg) == "too_short"
    assert check_response("Yes.", "en", "stop", cfg) == "too_short"
    assert check_response("I was born in Athens, friend.", "en", "length", cfg) == "over_long"
    assert check_response("word " * 50, "en", "stop", cfg) == "over_long"
    assert check_response("As an AI, I was never born.", "en", "stop", cfg) == "character_break"
    assert check_response("我出生在雅典的一个小村庄。", "en", "stop", cfg) == "wrong_language"
    assert check_response("I was born in Athens, friend.", "en", "length",
                          FiltersConfig(drop_truncated=False)) is None


def test_filter_counts():
    counts = FilterCounts()
    counts.add("responses", None)
    counts.add("responses", "over_long")
    counts.add("responses", "over_long")
    d = counts.as_dict()["responses"]
    assert d["kept"] == 1 and d["over_long"] == 2 and d["total"] == 3
    assert set(REASONS) <= set(d)
    with pytest.raises(ValueError):
        counts.add("responses", "bogus")
