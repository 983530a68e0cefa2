"""Simulation prompts (EN/ZH), the query schema and its parsing."""

from __future__ import annotations

import json
import re

import pytest

from ditto_jax.data.characters import default_characters
from ditto_jax.simulation import prompts
from ditto_jax.simulation.queries import QueryTask, build_tasks, parse_questions, question_schema, task_messages


@pytest.fixture(scope="module")
def chars():
    cs = default_characters()
    return {"en": [c for c in cs if c.lang == "en"], "zh": [c for c in cs if c.lang == "zh"]}


def _profile_pieces(c) -> list[str]:
    first_sentence = prompts.split_sentences(prompts.introduction(c))[0]
    return [c.label, c.description, *c.aliases, *c.claims.keys(), *c.claims.values(), first_sentence]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_query_prompt_has_both_profiles_and_instructions(chars, lang):
    a, b = chars[lang][0], chars[lang][7]
    messages = prompts.query_messages(a, b, 3, lang)
    assert [m["role"] for m in messages] == ["system", "user"]
    text = messages[1]["content"]
    for piece in _profile_pieces(a) + _profile_pieces(b):
        assert piece in text, piece
    required = {
        "en": ["Design 3 questions", f"{a.label} can answer", f"{b.label} could not answer", "era", "genre",
               "occupation", "age", "knowledge", "second person", "casual", "Write the questions in English",
               '[{"question": "..."}, {"question": "..."}, {"question": "..."}]'],
        "zh": ["设计3个", f"{a.label}能回答", f"{b.label}无法回答", "时代", "题材", "职业", "年龄", "知识",
               "第二人称", "闲聊", "请用中文", '[{"question": "..."}, {"question": "..."}, {"question": "..."}]'],
    }[lang]
    for phrase in required:
        assert phrase in text, phrase
    other = "zh" if lang == "en" else "en"
    assert prompts.QUERY_SYSTEM[other] not in messages[0]["content"]


def test_query_prompt_language_follows_asker(chars):
    en, zh = chars["en"][0], chars["zh"][0]
    tasks = build_tasks([(0, en.id, zh.id), (0, zh.id, en.id)], {en.id: en, zh.id: zh})
    assert [t.lang for t in tasks] == ["en", "zh"]
    msgs = [task_messages(t, {en.id: en, zh.id: zh}, 3, prompts.ProfileBudget()) for t in tasks]
    assert "Design 3 questions" in msgs[0][1]["content"]
    assert "设计3个" in msgs[1][1]["content"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_response_prompt_profile_and_rules(chars, lang):
    c = chars[lang][3]
    messages = prompts.response_messages(c, "Q?", history=[("q1", "a1")])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    for piece in _profile_pieces(c):
        assert piece in system, piece
    rules = {
        "en": ["first person", "do not answer it", "Decline in character", "say why you cannot know it",
               "Never say or hint that you are an AI", "never mention a profile", "Do not keep repeating your own name",
               "Reply in English"],
        "zh": ["第一人称", "不要回答", "以角色的口吻婉拒", "说明你为什么不可能知道", "绝不说出或暗示你是人工智能",
               "绝不提及资料", "不要反复说自己的名字", "用中文回答"],
    }[lang]
    for phrase in rules:
        assert phrase in system, phrase
    assert messages[-1]["content"] == "Q?"


def test_profile_budget_shrinks_and_fit_prompt(chars):
    a, b = chars["en"][0], chars["en"][1]
    full = prompts.query_messages(a, b, 3, "en")[1]["content"]
    small = prompts.query_messages(a, b, 3, "en", prompts.ProfileBudget(0, 2))[1]["content"]
    assert len(small) < len(full) / 2
    assert list(a.claims.values())[0] in small and list(a.claims.values())[3] not in small

    def encode(messages):
        return list(messages[1]["content"].encode())

    ids, shortened = prompts.fit_prompt(lambda bud: prompts.query_messages(a, b, 3, "en", bud), encode, 4000, 3000)
    assert len(ids) <= 4000 and shortened
    ids, shortened = prompts.fit_prompt(lambda bud: prompts.query_messages(a, b, 3, "en", bud), encode, 100_000, 3000)
    assert not shortened
    with pytest.raises(prompts.PromptTooLong):
        prompts.fit_prompt(lambda bud: prompts.query_messages(a, b, 3, "en", bud), encode, 100, 3000)


def test_truncate_text_cuts_at_sentence_end():
    text = "One sentence here. Another sentence follows here. And a third one that is long."
    assert prompts.truncate_text(text, 55) == "One sentence here. Another sentence follows here."
    assert prompts.truncate_text(text, 1000) == text
    assert prompts.truncate_text("x" * 30, 10) == "x" * 10 + "…"


def test_parse_questions():
    good = json.dumps([{"question": " Where were you born? "}, {"question": "你好吗？"}, {"question": "Why?"}],
                      ensure_ascii=False)
    assert parse_questions(good, 3) == ["Where were you born?", "你好吗？", "Why?"]
    for bad in ["", "[", '[{"question": "a"}]', '{"question": "a"}', '[{"q": "a"}, {"q": "b"}, {"q": "c"}]',
                '[{"question": 1}, {"question": "b"}, {"question": "c"}]',
                '[{"question": "a", "x": 1}, {"question": "b"}, {"question": "c"}]']:
        assert parse_questions(bad, 3) is None, bad


def test_question_schema_regex_accepts_only_the_shape():
    from outlines_core.json_schema import build_regex_from_schema

    pattern = build_regex_from_schema(json.dumps(question_schema(3, 5, 40)), whitespace_pattern=r"[ ]?")
    ok = '[{"question": "Where were you born?"}, {"question": "你最喜欢什么诗？"}, {"question": "What is virtue?"}]'
    assert re.fullmatch(pattern, ok)
    assert parse_questions(ok, 3)
    assert not re.fullmatch(pattern, '[{"question": "Where?"}, {"question": "a"}, {"question": "What is virtue?"}]')
    assert not re.fullmatch(pattern, '[{"question": "Where were you born?"}]')


def test_query_task_ids_are_stable():
    t = QueryTask(2, "en-a", "en-b", "en")
    assert t.key == "r002/en-a/en-b" and t.request_id(1) == "r002/en-a/en-b/a1"
