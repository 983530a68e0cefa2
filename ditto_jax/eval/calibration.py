"""Judge calibration: the judge scores a small hand-labelled set before its scores are trusted.

The shipped set (``data/assets/eval_calibration.jsonl``, English and Chinese) has, per role, an answerable
question answered correctly (evidence-backed) and plainly wrongly, and an out-of-era question refused in
character; every answer carries unmistakable identity markers. One line::

    {"id", "lang": "en"|"zh", "label", "candidates": [str], "summary", "prompt", "evidence": [str], "answer",
     "refusal": 0|1, "knowledge": "good"|"bad"|null}

The items run through the same judge code path as the candidates (``judge_candidate``: prompts, shuffled
candidates, forced verdicts, parsing). Per metric we report:

* ``accuracy``: consistency — share of samples naming the true role (unparsable = wrong); rejection — share of
  samples equal to the label; knowledge — pairwise accuracy (share of (good, bad) answer pairs of a language
  where the good one scores higher; ties and unparsable count half).
* ``chance``: what a judge without information scores (1 / candidates; the majority label's share; 0.5).
* ``majority_verdict`` / ``majority_share``: the most frequent verdict and its share of the samples; for
  consistency also ``majority_position`` / ``position_share``: the most often chosen position in the shown
  (shuffled) list — a position-biased judge is near-constant there while its named roles vary.
* ``correlation`` (knowledge): Pearson correlation of sample scores with the good/bad label.

A metric is flagged **unreliable** when its accuracy is within ``margin`` of chance or its most frequent verdict
covers at least ``max_majority_share`` of the samples (a near-constant judge); the report and the printed table
then carry a plain warning.
"""

from __future__ import annotations

import importlib.resources
import math
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import pydantic

from ditto_jax.data.records import expand_paths, read_records
from ditto_jax.eval.metrics import TurnJudgement
from ditto_jax.eval.testsets import EvalSession, EvalTurn
from ditto_jax.eval.wikiroleeval import answer_request_id

NonEmpty = Annotated[str, pydantic.StringConstraints(strict=True, min_length=1)]


class CalibrationItem(pydantic.BaseModel):
    """One labelled judge-calibration item (see the module docstring)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    id: NonEmpty
    lang: Literal["en", "zh"]
    label: NonEmpty
    candidates: tuple[NonEmpty, ...] = pydantic.Field(min_length=2)
    summary: str = ""
    prompt: NonEmpty
    evidence: tuple[str, ...] = ()
    answer: NonEmpty
    refusal: Literal[0, 1]
    knowledge: Literal["good", "bad"] | None = None

    @pydantic.model_validator(mode="after")
    def _label_listed(self) -> "CalibrationItem":
        if self.label not in self.candidates:
            raise ValueError(f"label {self.label!r} is not among the candidates {list(self.candidates)}")
        return self


def default_calibration_path() -> Path:
    """The shipped calibration set."""
    return Path(str(importlib.resources.files("ditto_jax"))) / "data" / "assets" / "eval_calibration.jsonl"


def load_calibration(path: str | Path | None = None, limit: int | None = None) -> list[CalibrationItem]:
    """Calibration items (``None`` = the shipped set); ``limit``: first N per language. A malformed line is an
    error naming file, line and field."""
    files = [default_calibration_path()] if path is None else expand_paths(path)
    if not files:
        raise FileNotFoundError(f"no calibration files at {path}")
    items, _ = read_records(files, lambda obj, p, n: CalibrationItem.model_validate(obj), "fail",
                            key=lambda it: it.id)
    if limit is not None:
        seen: Counter[str] = Counter()
        kept = []
        for it in items:
            seen[it.lang] += 1
            if seen[it.lang] <= limit:
                kept.append(it)
        items = kept
    return items


def as_sessions(items: Sequence[CalibrationItem]) -> tuple[list[EvalSession], dict[str, str]]:
    """The items as one-turn sessions and their fixed answers (keyed like candidate answers)."""
    sessions, answers = [], {}
    for it in items:
        sessions.append(EvalSession(
            id=it.id, system=f"You are {it.label}.", label=it.label, lang=it.lang, candidates=it.candidates,
            summary=it.summary, turns=(EvalTurn(prompt=it.prompt, reject=it.refusal, evidence=it.evidence),)))
        answers[answer_request_id(it.id, 0)] = it.answer
    return sessions, answers


def _majority(verdicts: Sequence[Any]) -> tuple[Any, float]:
    if not verdicts:
        return None, 0.0
    value, count = Counter(verdicts).most_common(1)[0]
    return value, count / len(verdicts)


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def _verdict(value: Any) -> Any:
    return "unparsable" if value is None else value


def score_calibration(items: Sequence[CalibrationItem], turns: Sequence[TurnJudgement], margin: float = 0.1,
                      max_majority_share: float = 0.9, rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Per-metric calibration of the judge (see the module docstring); ``turns``: the judge's parsed samples
    of each item (one turn per item); ``rows``: its judgements.jsonl rows (for the chosen positions)."""
    by_id = {t.session: t for t in turns}
    out: dict[str, Any] = {}

    cons_ok, cons_verdicts, chance = [], [], []
    rej_ok, rej_verdicts, labels = [], [], []
    for it in items:
        t = by_id[it.id]
        for v in t.consistency:
            cons_ok.append(float(v is not None and v == t.answer_index))
            cons_verdicts.append(_verdict(None if v is None else (it.candidates[v] if v >= 0 else "(not listed)")))
            chance.append(1.0 / len(it.candidates))
        for v in t.rejection:
            rej_ok.append(float(v is not None and v == it.refusal))
            rej_verdicts.append(_verdict(v))
            labels.append(it.refusal)
    if cons_ok:
        out["consistency"] = {"accuracy": sum(cons_ok) / len(cons_ok), "chance": sum(chance) / len(chance),
                              "samples": len(cons_ok), "unparsable": cons_verdicts.count("unparsable"),
                              "verdicts": cons_verdicts}
    if rej_ok:
        share = max(labels.count(0), labels.count(1)) / len(labels)
        out["rejection"] = {"accuracy": sum(rej_ok) / len(rej_ok), "chance": share, "samples": len(rej_ok),
                            "unparsable": rej_verdicts.count("unparsable"), "verdicts": rej_verdicts}

    good: dict[str, list[float | None]] = {}
    bad: dict[str, list[float | None]] = {}
    xs, ys, k_verdicts = [], [], []
    for it in items:
        if it.knowledge is None:
            continue
        t = by_id[it.id]
        scores = [v for v in t.knowledge if v is not None]
        k_verdicts += [_verdict(v) for v in t.knowledge]
        mean = sum(scores) / len(scores) if scores else None
        (good if it.knowledge == "good" else bad).setdefault(it.lang, []).append(mean)
        for v in scores:
            xs.append(float(v))
            ys.append(1.0 if it.knowledge == "good" else 0.0)
    pairs, wins = 0, 0.0
    for lang, goods in good.items():
        for g in goods:
            for b in bad.get(lang, []):
                pairs += 1
                if g is not None and b is not None:
                    wins += 1.0 if g > b else 0.5 if g == b else 0.0
                else:
                    wins += 0.5
    if pairs:
        corr = _pearson(xs, ys)
        out["knowledge"] = {"accuracy": wins / pairs, "chance": 0.5, "samples": len(k_verdicts),
                            "unparsable": k_verdicts.count("unparsable"), "verdicts": k_verdicts,
                            "correlation": None if corr is None else round(corr, 4)}

    positions = [r["candidates_shown"].index(r["chosen"]) if r.get("chosen") in r.get("candidates_shown", ())
                 else "unparsable" if r.get("verdict") is None else "(not listed)"
                 for r in rows if r.get("metric") == "consistency"]
    for metric, m in out.items():
        verdicts = m.pop("verdicts")
        value, share = _majority(verdicts)
        if metric == "consistency" and positions:
            pos, pos_share = _majority(positions)
            m["majority_position"], m["position_share"] = pos, round(pos_share, 4)
            if pos_share > share and pos != "unparsable":
                value, share = f"position {pos + 1 if isinstance(pos, int) else pos}", pos_share
        m["majority_verdict"] = value
        m["majority_share"] = round(share, 4)
        m["accuracy"] = round(m["accuracy"], 4)
        m["chance"] = round(m["chance"], 4)
        reasons = []
        if m["accuracy"] <= m["chance"] + margin:
            reasons.append(f"accuracy {m['accuracy']:.2f} is no better than chance ({m['chance']:.2f})")
        if share >= max_majority_share:
            reasons.append(f"near-constant: {share:.0%} of its samples are {value!r}")
        m["reliable"] = not reasons
        if reasons:
            m["warning"] = (f"judge calibration, {metric}: " + "; ".join(reasons)
                            + f" — the {metric} scores below are unreliable")
    return out


def warnings(calibration: Mapping[str, Any] | None) -> list[str]:
    """The plain warnings of a report's ``calibration`` section (empty when the judge passed or was not
    calibrated)."""
    if not calibration:
        return []
    return [m["warning"] for m in (calibration.get("metrics") or {}).values() if m.get("warning")]
