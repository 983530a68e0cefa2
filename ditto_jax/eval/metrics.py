"""WikiRoleEval metric math: from parsed judge samples per turn to the report's numbers.

Per turn, the judge is sampled ``n`` times per metric; each sample parses to a value or ``None`` (unparsable).

This follows the paper's ``scoring.py`` and ``get_*_score`` functions (OFA-Sys/Ditto):

* consistency: a sample scores 1 when the named role is the true role, else 0 (a name not among the candidates
  is parsed and scores 0); the turn's score is the mean over its parsable samples, and **0 when no sample
  parses** (the reference: ``np.mean`` of an empty list is NaN, replaced by 0). Such turns stay in the mean.
* knowledge: the turn's score is the mean of its parsable 1-10 samples; a turn with none is left out of the mean
  (the reference turns a missing score into NaN and averages with ``skipna``).
* rejection: the turn's prediction is the majority of its parsable 0/1 samples; **a tie** (n even, or an odd n with
  unparsable samples, e.g. one 1 and one 0) **resolves by ``tie_rule``** — ``"first"`` (default; the reference's
  ``Counter.most_common`` keeps the first sample's vote among equals), ``"not_refused"`` or ``"refused"``. The
  turn scores 1 when the prediction equals its label. A turn with no parsable vote is left out (the reference
  would crash on it).

A metric is the mean of the turn scores, overall and per language. Every unparsable sample is counted under
``unparsable[metric]["samples"]`` and every turn without a parsable sample under ``["turns"]`` (and, for
consistency, scored 0 as above): nothing is dropped without being counted.
With ``knowledge_turns="answerable"`` the knowledge metric covers only turns whose rejection label is 0 (turns
left out this way are counted under ``counts["knowledge_turns_skipped"]``); the paper uses all turns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Literal, Sequence

TieRule = Literal["first", "not_refused", "refused"]
KnowledgeTurns = Literal["all", "answerable"]
SPLITS = ("all", "en", "zh")


@dataclasses.dataclass(frozen=True)
class TurnJudgement:
    """Parsed judge samples of one turn (``None`` = unparsable sample).

    ``consistency`` holds chosen option indices; ``answer_index`` is the true role's index.
    ``failures`` maps metric -> reasons of its unparsable samples (``"length"``, ``"no_match"``, ``"too_long"``).
    """

    session: str
    turn: int
    lang: str
    reject_label: int
    answer_index: int
    consistency: tuple[int | None, ...]
    knowledge: tuple[int | None, ...]
    rejection: tuple[int | None, ...]
    failures: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _parsed(values: Iterable[Any]) -> list[Any]:
    return [v for v in values if v is not None]


def consistency_score(choices: Sequence[int | None], answer_index: int) -> float:
    """Mean correctness over parsable samples; 0.0 when none parsed (as the reference)."""
    ok = _parsed(choices)
    return sum(int(c == answer_index) for c in ok) / len(ok) if ok else 0.0


def knowledge_score(scores: Sequence[int | None]) -> float | None:
    """Mean of parsable 1-10 scores (``None`` when none parsed)."""
    ok = _parsed(scores)
    return sum(ok) / len(ok) if ok else None


def majority_refusal(votes: Sequence[int | None], tie_rule: TieRule = "first") -> int | None:
    """Majority of the parsable 0/1 votes; a tie goes by ``tie_rule`` (``first``: the first parsable vote);
    ``None`` when none parsed."""
    ok = _parsed(votes)
    if not ok:
        return None
    ones = sum(ok)
    zeros = len(ok) - ones
    if ones != zeros:
        return int(ones > zeros)
    if tie_rule == "first":
        return int(ok[0])
    return 1 if tie_rule == "refused" else 0


def rejection_correct(votes: Sequence[int | None], label: int, tie_rule: TieRule = "first") -> float | None:
    """1.0 when the majority vote equals ``label``, 0.0 when not, ``None`` when no vote parsed."""
    pred = majority_refusal(votes, tie_rule)
    return None if pred is None else float(pred == label)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def aggregate(turns: Sequence[TurnJudgement], tie_rule: TieRule = "first",
              knowledge_turns: KnowledgeTurns = "all") -> dict[str, Any]:
    """``{"metrics": {split: {consistency, knowledge, rejection}}, "unparsable": {...}, "counts": {...}}``.

    Splits with no turns (e.g. ``zh`` on an English-only set) have ``None`` metrics.
    """
    per: dict[str, dict[str, list[float]]] = {s: {m: [] for m in ("consistency", "knowledge", "rejection")}
                                              for s in SPLITS}
    unparsable = {m: {"samples": 0, "turns": 0, "total_samples": 0, "reasons": {}} for m in
                  ("consistency", "knowledge", "rejection")}
    turns_by_lang = {s: 0 for s in SPLITS}
    knowledge_skipped = 0
    for t in turns:
        splits = ("all", t.lang) if t.lang in SPLITS else ("all",)
        for s in splits:
            turns_by_lang[s] += 1
        scores = {
            "consistency": consistency_score(t.consistency, t.answer_index),
            "knowledge": knowledge_score(t.knowledge),
            "rejection": rejection_correct(t.rejection, t.reject_label, tie_rule),
        }
        skip_knowledge = knowledge_turns == "answerable" and t.reject_label == 1
        knowledge_skipped += int(skip_knowledge)
        for metric, score in scores.items():
            if metric == "knowledge" and skip_knowledge:
                continue
            samples = getattr(t, metric)
            u = unparsable[metric]
            u["total_samples"] += len(samples)
            u["samples"] += sum(v is None for v in samples)
            for reason in t.failures.get(metric, ()):
                u["reasons"][reason] = u["reasons"].get(reason, 0) + 1
            if not any(v is not None for v in samples):
                u["turns"] += 1
            if score is None:
                continue
            for s in splits:
                per[s][metric].append(score)
    metrics = {s: {m: _round(_mean(v)) for m, v in ms.items()} for s, ms in per.items()}
    counts = {"turns": turns_by_lang["all"], "turns_by_lang": {"en": turns_by_lang["en"], "zh": turns_by_lang["zh"]},
              "scored_turns": {m: len(per["all"][m]) for m in per["all"]},
              "knowledge_turns_skipped": knowledge_skipped}
    return {"metrics": metrics, "unparsable": unparsable, "counts": counts}


@dataclasses.dataclass(frozen=True)
class MTBenchJudgement:
    """Parsed 1-10 samples of one MT-Bench answer (question, turn 0 or 1)."""

    question_id: int
    turn: int
    scores: tuple[int | None, ...]
    failures: tuple[str, ...] = ()


def aggregate_mtbench(items: Sequence[MTBenchJudgement]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({"roleplay", "turn1", "turn2", "questions", "answers"}, unparsable)``: the mean of per-answer means
    over answers with a parsable sample (overall and per turn)."""
    by_turn: dict[int, list[float]] = {0: [], 1: []}
    unparsable = {"samples": 0, "turns": 0, "total_samples": 0, "reasons": {}}
    for it in items:
        unparsable["total_samples"] += len(it.scores)
        unparsable["samples"] += sum(v is None for v in it.scores)
        for reason in it.failures:
            unparsable["reasons"][reason] = unparsable["reasons"].get(reason, 0) + 1
        score = knowledge_score(it.scores)
        if score is None:
            unparsable["turns"] += 1
        else:
            by_turn.setdefault(it.turn, []).append(score)
    every = [s for v in by_turn.values() for s in v]
    result = {"roleplay": _round(_mean(every)), "turn1": _round(_mean(by_turn[0])), "turn2": _round(_mean(by_turn[1])),
              "questions": len({it.question_id for it in items}), "answers": len(items)}
    return result, unparsable
