"""WikiRoleEval metric math from known judge outputs: means, majority votes, ties, unparsable samples, languages."""

from __future__ import annotations

import pytest

from ditto_jax.eval.metrics import (
    MTBenchJudgement,
    TurnJudgement,
    aggregate,
    aggregate_mtbench,
    consistency_score,
    knowledge_score,
    majority_refusal,
    rejection_correct,
)


def turn(lang: str, label: int, cons, know, rej, answer: int = 2, failures=None) -> TurnJudgement:
    return TurnJudgement("s", 0, lang, label, answer, tuple(cons), tuple(know), tuple(rej), failures or {})


def test_consistency_is_mean_correctness_over_parsable_samples():
    assert consistency_score([2, 2, 0], 2) == pytest.approx(2 / 3)
    assert consistency_score([2, None, 0], 2) == pytest.approx(1 / 2)
    assert consistency_score([None, None, None], 2) == 0.0  # the reference: no parsable sample scores 0
    assert consistency_score([1, 3, 0], 2) == 0.0
    assert consistency_score([-1, 2], 2) == 0.5  # a name not among the candidates is parsed and wrong


def test_knowledge_is_mean_of_parsable_scores():
    assert knowledge_score([7, 8, 9]) == pytest.approx(8.0)
    assert knowledge_score([10, None, 1]) == pytest.approx(5.5)
    assert knowledge_score([None]) is None


@pytest.mark.parametrize("votes,rule,expected", [
    ([1, 1, 0], "not_refused", 1),
    ([0, 0, 1], "refused", 0),
    ([1, 0], "not_refused", 0),        # n even: a tie
    ([1, 0], "refused", 1),
    ([1, 0, None], "not_refused", 0),  # odd n, one unparsable: a tie among the parsable votes
    ([1, 0, None], "refused", 1),
    ([1, None, None], "not_refused", 1),
    ([None, None, None], "not_refused", None),
    ([1, 1, 0, 0], "not_refused", 0),
    ([1, 0], "first", 1),              # the reference: Counter.most_common keeps the first vote among equals
    ([None, 0, 1], "first", 0),
    ([0, 1, 1], "first", 1),
])
def test_majority_refusal_and_tie_rule(votes, rule, expected):
    assert majority_refusal(votes, rule) == expected


def test_rejection_correct_compares_majority_with_label():
    assert rejection_correct([1, 1, 0], 1) == 1.0
    assert rejection_correct([1, 1, 0], 0) == 0.0
    assert rejection_correct([1, 0], 1, "not_refused") == 0.0  # tie -> not refused -> wrong for a refusal label
    assert rejection_correct([1, 0], 1) == 1.0  # default "first": the first vote wins the tie
    assert rejection_correct([1, 0], 1, "refused") == 1.0
    assert rejection_correct([None], 0) is None


def test_aggregate_per_language_splits_and_unparsable_counts():
    turns = [
        # en: consistency 1.0, 0.5 -> 0.75; knowledge 8, 4 -> 6; rejection right, wrong -> 0.5
        turn("en", 0, [2, 2, 2], [8, 8, 8], [0, 0, 1]),
        turn("en", 1, [2, 0, None], [3, 5, None], [0, 0, 1], failures={"consistency": ("length",),
                                                                      "knowledge": ("no_match",)}),
        # zh: consistency 0; knowledge unparsable turn; rejection tie (1,0,None) -> not refused, label 0 -> right
        turn("zh", 0, [1, 1, 1], [None, None, None], [1, 0, None],
             failures={"knowledge": ("length", "length", "too_long"), "rejection": ("no_match",)}),
        # zh: no parsable identity verdict -> scores 0 and stays in the mean (the reference); counted
        turn("zh", 0, [None, None, None], [5, 5, 5], [0, 0, 0], failures={"consistency": ("no_match",) * 3}),
    ]
    rep = aggregate(turns, "not_refused")
    m = rep["metrics"]
    assert m["en"] == {"consistency": 0.75, "knowledge": 6.0, "rejection": 0.5}
    assert m["zh"] == {"consistency": 0.0, "knowledge": 5.0, "rejection": 1.0}
    assert m["all"]["consistency"] == pytest.approx(round((1.0 + 0.5 + 0.0 + 0.0) / 4, 4))
    assert m["all"]["knowledge"] == pytest.approx(round((8 + 4 + 5) / 3, 4))  # the no-parse turn: excluded
    assert m["all"]["rejection"] == pytest.approx(round(3 / 4, 4))
    u = rep["unparsable"]
    assert u["consistency"] == {"samples": 4, "turns": 1, "total_samples": 12, "reasons": {"length": 1, "no_match": 3}}
    assert u["knowledge"] == {"samples": 4, "turns": 1, "total_samples": 12,
                              "reasons": {"no_match": 1, "length": 2, "too_long": 1}}
    assert u["rejection"]["samples"] == 1 and u["rejection"]["turns"] == 0
    assert rep["counts"]["turns"] == 4
    assert rep["counts"]["turns_by_lang"] == {"en": 2, "zh": 2}
    assert rep["counts"]["scored_turns"] == {"consistency": 4, "knowledge": 3, "rejection": 4}


def test_aggregate_tie_rule_changes_rejection():
    turns = [turn("en", 1, [2], [5], [1, 0]), turn("en", 0, [2], [5], [0, 1])]
    assert aggregate(turns, "not_refused")["metrics"]["all"]["rejection"] == 0.5
    assert aggregate(turns, "refused")["metrics"]["all"]["rejection"] == 0.5
    turns = [turn("en", 1, [2], [5], [1, 0]), turn("en", 1, [2], [5], [0, 1])]
    assert aggregate(turns, "not_refused")["metrics"]["all"]["rejection"] == 0.0
    assert aggregate(turns, "refused")["metrics"]["all"]["rejection"] == 1.0


def test_aggregate_answerable_knowledge_skips_refusal_turns():
    turns = [turn("en", 0, [2], [9], [0]), turn("en", 1, [2], [1], [1])]
    assert aggregate(turns)["metrics"]["all"]["knowledge"] == 5.0
    rep = aggregate(turns, knowledge_turns="answerable")
    assert rep["metrics"]["all"]["knowledge"] == 9.0
    assert rep["counts"]["knowledge_turns_skipped"] == 1
    assert rep["unparsable"]["knowledge"]["total_samples"] == 1


def test_aggregate_empty_language_is_null():
    rep = aggregate([turn("en", 0, [2], [5], [0])])
    assert rep["metrics"]["zh"] == {"consistency": None, "knowledge": None, "rejection": None}


def test_mtbench_aggregate():
    items = [MTBenchJudgement(91, 0, (8, 6, None), ("length",)), MTBenchJudgement(91, 1, (4, 4, 4)),
             MTBenchJudgement(92, 0, (None, None, None), ("no_match",) * 3), MTBenchJudgement(92, 1, (10, 10, 10))]
    result, unparsable = aggregate_mtbench(items)
    assert result["turn1"] == 7.0
    assert result["turn2"] == 7.0
    assert result["roleplay"] == pytest.approx(round((7 + 4 + 10) / 3, 4))
    assert result["questions"] == 2 and result["answers"] == 4
    assert unparsable == {"samples": 4, "turns": 1, "total_samples": 12, "reasons": {"length": 1, "no_match": 3}}
