"""Judge prompts (EN/ZH), option text, output constraints over the real tokenizer, and parsers."""

from __future__ import annotations

import re

import pytest

from ditto_jax.data.characters import default_characters
from ditto_jax.eval import judge as J
from ditto_jax.eval.testsets import load_wikiroleeval
from ditto_jax.eval.wikiroleeval import session_options
from ditto_jax.tokenizer import default_tokenizer


def test_prompts_in_session_language_contain_the_turn():
    en = J.consistency_messages("en", "Who are you?", "I am a sailor.", ["A one", "B two", "C three", "D four"])
    assert en[0]["role"] == "system" and en[1]["role"] == "user"
    assert "Who are you?" in en[1]["content"] and "I am a sailor." in en[1]["content"]
    assert "A. A one" in en[1]["content"] and "D. D four" in en[1]["content"] and "A, B, C, D" in en[1]["content"]
    zh = J.knowledge_messages("zh", "张衡", "东汉天文学家。", ["造地动仪"], "地动仪？", "它有八条龙。")
    assert "张衡" in zh[1]["content"] and "- 造地动仪" in zh[1]["content"] and "10（" in zh[1]["content"]
    assert "参考事实" in zh[1]["content"]
    none = J.knowledge_messages("en", "X", "s", [], "q", "a")
    assert "(none for this question)" in none[1]["content"]
    rej = J.rejection_messages("en", "Ada", "Do you use a smartphone?", "What is that?")
    assert "Reply with 1 or 0 only" in rej[1]["content"] and "Ada" in rej[1]["content"]
    mt = J.mtbench_messages(["first q", "second q"], ["ans1", "ans2"], 1)
    assert "first q" in mt[1]["content"] and "ans2" in mt[1]["content"] and "second question" in mt[1]["content"]
    mt0 = J.mtbench_messages(["first q", "second q"], ["ans1"], 0)
    assert "second q" not in mt0[1]["content"]


def test_options_use_first_sentence_of_kb_description():
    assert J.first_sentence("King of England. Won at Crecy.") == "King of England."
    assert J.first_sentence("东汉天文学家。发明地动仪。") == "东汉天文学家。"
    assert J.first_sentence("no period here") == "no period here"
    sessions, _ = load_wikiroleeval()
    descriptions = J.descriptions_by_label(default_characters())
    for s in sessions:
        opts = session_options(s, descriptions)
        assert len(opts) == 4
        for cand, opt in zip(s.candidates, opts):
            assert opt.startswith(cand)
            if cand in descriptions:
                assert J.first_sentence(descriptions[cand]) in opt
    unknown = session_options(sessions[0].model_copy(update={"candidates": ("Nobody Known", sessions[0].label)}), {})
    assert unknown[0] == "Nobody Known"


@pytest.mark.parametrize("text,expected", [
    ("B", 1), (" C\n", 2), ("(A)", 0), ("D.", 3), ("Answer: B", 1), ("答案：C", 2), ("E", None), ("", None),
    ("I think", None), ("The answer is d", None),
])
def test_parse_choice(text, expected):
    assert J.parse_choice(text, 4) == expected


@pytest.mark.parametrize("text,expected", [
    ("7", 7), ("10", 10), ("1", 1), (" 3 ", 3), ("0", None), ("11", None), ("Score: 8", 8), ("[[6]]", 6),
    ("analysis...\n9", 9), ("seven", None), ("", None),
])
def test_parse_score(text, expected):
    assert J.parse_score(text) == expected


@pytest.mark.parametrize("text,expected", [("1", 1), ("0", 0), (" 0\n", 0), ("yes", None), ("10", None)])
def test_parse_binary(text, expected):
    assert J.parse_binary(text) == expected


def test_parse_output_dispatch_and_none():
    assert J.parse_output("rejection", None) is None
    assert J.parse_output("mtbench", "5") == 5
    with pytest.raises(ValueError):
        J.parse_output("style", "1")


@pytest.mark.parametrize("metric,accepted,rejected", [
    ("consistency", ["A", "B", "C", "D"], ["E", "AB", ""]),
    ("knowledge", [str(i) for i in range(1, 11)], ["0", "11", "01", ""]),
    ("rejection", ["0", "1"], ["2", "10", ""]),
])
def test_output_patterns(metric, accepted, rejected):
    pattern = J.output_pattern(metric, 4)
    for text in accepted:
        assert re.fullmatch(pattern, text) and J.parse_output(metric, text, 4) is not None
    for text in rejected:
        assert not re.fullmatch(pattern, text)


def test_constraints_compile_over_the_embedded_tokenizer():
    tok = default_tokenizer()
    c = J.judge_constraint("knowledge", tok, tok.vocab_size + 8)
    allowed = [i for i in range(tok.vocab_size) if c.allowed(c.initial_state)[i]]
    texts = {tok.decode([i]) for i in allowed}
    assert texts and all(t.strip().isdigit() for t in texts)
    c = J.judge_constraint("consistency", tok, tok.vocab_size, num_options=3)
    texts = {tok.decode([i]) for i in range(tok.vocab_size) if c.allowed(c.initial_state)[i]}
    assert texts <= {"A", "B", "C"} and texts


# ------------------------------------------------------------------------------------------------------------
# the reference protocol (OFA-Sys/Ditto eval/call_openai_api_gpt4_eval.py: structure and answer formats)
# ------------------------------------------------------------------------------------------------------------
def test_reference_prompts_structure():
    cons = J.ref_consistency_messages("en", "Who rules France?", "I, the Emperor, do.", ["Ada", "Napoleon"])
    assert len(cons) == 1 and cons[0]["role"] == "user"  # one user message, no system prompt (as the reference)
    text = cons[0]["content"]
    assert "- Ada\n- Napoleon" in text and "[Instruction]" in text and "[Response]" in text
    assert "step by step" in text and "The most suitable role is [character name]." in text
    assert "—" not in text  # candidates carry no description
    zh = J.ref_consistency_messages("zh", "你是谁？", "我是张衡。", ["张衡", "华佗"])[0]["content"]
    assert "- 张衡\n- 华佗" in zh and "最符合的角色为[角色名]" in zh and "一步一步" in zh
    know = J.ref_knowledge_messages("en", "Ada", "A mathematician.", ["fact one"], "q?", "a.")[0]["content"]
    assert "- fact one" in know and "First" in know and "last line" in know and "1 to 10" in know
    rej = J.ref_rejection_messages("zh", "张衡", "q", "a")[0]["content"]
    assert "1" in rej and "0" in rej and "张衡" in rej
    mt = J.ref_mtbench_messages(["q1", "q2"], ["a1", "a2"], 1)
    assert "[[rating]]" in mt[1]["content"] and "a2" in mt[1]["content"]
    tpl = {"system_prompt": "SYS", "prompt_template": "Q={question} A={answer} [[rating]]"}
    assert J.ref_mtbench_messages(["q1"], ["a1"], 0, tpl) == [{"role": "system", "content": "SYS"},
                                                              {"role": "user", "content": "Q=q1 A=a1 [[rating]]"}]


@pytest.mark.parametrize("text,lang,expected", [
    ("The reply mentions Waterloo.\nThe most suitable role is [Napoleon].", "en", 1),
    ("Analysis... the most suitable role is [ ada ]", "en", 0),               # case and spaces folded
    ("I must end with 'The most suitable role is [character name]'. ... The most suitable role is [Ada].", "en", 0),
    ("The most suitable role is [Cleopatra].", "en", -1),                    # parsed, not listed: scores 0
    ("I think it is Napoleon.", "en", None),
    ("分析……最符合的角色为[张衡]", "zh", 2),
    ("最符合的角色为【张衡】", "zh", 2),
    ("", "en", None),
])
def test_parse_role(text, lang, expected):
    assert J.parse_role(text, lang, ["Ada", "Napoleon", "张衡"]) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is accurate and rich.\n8", 8), ("analysis\nScore: 7", 7), ("analysis\n**9**", 9),
    ("analysis\n10\n", 10), ("分析\n评分：6", 6), ("analysis 8", None), ("analysis\n8 because", None),
    ("analysis\n0", None), ("analysis\n11", None), ("7\nmore text", None),
])
def test_parse_last_line_score(text, expected):
    assert J.parse_last_line_score(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Good answer. Rating: [[8]]", 8), ("[[2.5]]", 2.5), ("e.g. [[5]] ... Rating: [[9]]", 9), ("Rating: [7]", 7),
    ("Rating: 8", None), ("[[11]]", None),
])
def test_parse_rating(text, expected):
    assert J.parse_rating(text) == expected


def test_shuffled_order_is_seeded_and_spreads_the_true_role():
    assert J.shuffled_order(4, 0, "s/t00/s0") == J.shuffled_order(4, 0, "s/t00/s0")
    orders = [tuple(J.shuffled_order(4, 0, f"s/t{t:02d}/s{k}")) for t in range(20) for k in range(3)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # where index 0 (say the true role) is shown: every position occurs, none dominates
    positions = [o.index(0) for o in orders]
    assert set(positions) == {0, 1, 2, 3} and max(positions.count(p) for p in range(4)) < 30
    assert J.shuffled_order(4, 1, "s/t00/s0") != J.shuffled_order(4, 0, "s/t00/s0") or \
        J.shuffled_order(4, 1, "s/t01/s0") != J.shuffled_order(4, 0, "s/t01/s0")


def test_verdict_patterns_force_parsable_verdicts():
    for metric, lead_text, forced in [("consistency", "The most suitable role is [", "Ada]"),
                                      ("knowledge", "\n", "7"), ("mtbench", "\nRating: [[", "7]]")]:
        assert re.fullmatch(J.verdict_pattern(metric), forced)
        raw = "free reasoning" + J.VERDICT_LEAD[(metric, "en")] + forced
        assert J.parse_reference(metric, raw, "en", ["Ada", "Bob"]) is not None
    zh = "分析" + J.VERDICT_LEAD[("consistency", "zh")] + "张衡]"
    assert J.parse_reference("consistency", zh, "zh", ["华佗", "张衡"]) == 1


@pytest.mark.parametrize("metric,text,lang,lead,expected", [
    ("consistency", "The most suitable role is [Napoleon].", "en", "", 0),
    ("consistency", "Let me analyse the reply step by step.\nThe most suitable role is [Napoleon].", "en",
     J.ANALYSIS_LEAD[("consistency", "en")], 0),
    ("consistency", "He speaks of Austerlitz and his Grande Armée.\nThe most suitable role is [Napoleon].", "en", "", 8),
    ("consistency", "回复提到了奥斯特里茨战役。\n最符合的角色为[拿破仑]", "zh", "", 6),
    ("consistency", "Hmm.\nThe most suitable role is [X]", "zh", "", 2),  # the other language's sentence
    ("knowledge", "Analysis: the answer matches the tips.\n7", "en", J.ANALYSIS_LEAD[("knowledge", "en")], 5),
    ("knowledge", "7", "en", "", 0),
    ("mtbench", "Good answer, in character.\nRating: [[6]]", "en", "", 4),
    ("rejection", "1", "en", "", 0),
])
def test_reasoning_words_counts_what_precedes_the_verdict(metric, text, lang, lead, expected):
    assert J.reasoning_words(metric, text, lang, lead) == expected
