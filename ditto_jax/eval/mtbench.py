"""MT-Bench roleplay: two-turn answering by the candidate and 1-10 single-answer grading by the judge.

The candidate answers turn 1, then turn 2 with its own first answer in the conversation (no system prompt: the
model's chat format applies its default, as MT-Bench does). The judge grades each answer ``samples`` times,
seeing the dialogue up to that answer; the score is the mean over answers of the per-answer mean.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ditto_jax.eval import judge as J
from ditto_jax.eval.metrics import MTBenchJudgement
from ditto_jax.eval.testsets import MTBenchQuestion
from ditto_jax.eval.wikiroleeval import Encode, JudgeLimits, JudgeTask, Prompt, failure_reason, fit_judge_prompt


def answer_request_id(question_id: int, turn: int) -> str:
    """Request id of the candidate's answer to ``turn`` (0/1) of a question."""
    return f"mtbench/q{question_id:04d}/t{turn}"


def judge_request_id(question_id: int, turn: int, sample: int) -> str:
    """Request id of one judge sample."""
    return f"mtbench/q{question_id:04d}/t{turn}/s{sample}"


def answer_prompts(questions: Sequence[MTBenchQuestion], turn: int, answers: Mapping[str, str], encode: Encode | None,
                   budget: int) -> list[Prompt]:
    """Answer requests for ``turn``; turn 1 includes the question's first turn and the candidate's first answer
    (dropped, counted in ``trimmed``, if the conversation does not fit)."""
    out = []
    for q in questions:
        msgs: list[dict[str, str]] = []
        if turn == 1:
            msgs = [{"role": "user", "content": q.turns[0]},
                    {"role": "assistant", "content": answers[answer_request_id(q.question_id, 0)]}]
        msgs = msgs + [{"role": "user", "content": q.turns[turn]}]
        if encode is None:  # an endpoint model: messages as they are
            out.append(Prompt(answer_request_id(q.question_id, turn), None, 0, msgs))
            continue
        ids = encode(msgs)
        trimmed = 0
        if len(ids) > budget and len(msgs) > 1:
            msgs = msgs[-1:]
            ids, trimmed = encode(msgs), 1
        text = q.turns[turn]
        while len(ids) > budget and len(text) > 1:
            text = text[: len(text) // 2]
            msgs = [{"role": "user", "content": text}]
            ids, trimmed = encode(msgs), trimmed + 1
        out.append(Prompt(answer_request_id(q.question_id, turn), ids, trimmed, msgs))
    return out


def judge_tasks(questions: Sequence[MTBenchQuestion], answers: Mapping[str, str], encode: Encode | None, samples: int,
                limits: JudgeLimits, budget: int, protocol: str = "reference",
                templates: Mapping[str, Mapping[str, str]] | None = None) -> list[JudgeTask]:
    """Judge requests for both turns of every question, ``samples`` each. ``templates``: FastChat
    ``judge_prompts.jsonl`` records by name (``single-v1``, ``single-v1-multi-turn``) for the reference protocol."""
    tasks = []
    for q in questions:
        for turn in (0, 1):
            def build(lim: JudgeLimits, q: MTBenchQuestion = q, turn: int = turn) -> list[dict[str, str]]:
                replies = [J.clip(answers[answer_request_id(q.question_id, i)], lim.answer) for i in range(turn + 1)]
                qs = [J.clip(t, lim.summary) for t in q.turns]
                if protocol == "terse":
                    return J.mtbench_messages(qs, replies, turn)
                template = None
                if templates:
                    template = templates["single-v1" if turn == 0 else "single-v1-multi-turn"]
                return J.ref_mtbench_messages(qs, replies, turn, template)

            ids, _, messages = fit_judge_prompt(build, encode, limits, budget)
            for k in range(samples):
                tasks.append(JudgeTask(judge_request_id(q.question_id, turn, k), f"q{q.question_id:04d}", turn,
                                       "mtbench", k, ids, 0, messages, (), J.text_lang(q.turns[0])))
    return tasks


def collect_judgements(questions: Sequence[MTBenchQuestion], tasks: Sequence[JudgeTask],
                       outputs: Mapping[str, Mapping[str, Any]], protocol: str = "reference",
                       rows: list[dict[str, Any]] | None = None) -> list[MTBenchJudgement]:
    """Parse the judge outputs into one ``MTBenchJudgement`` per (question, turn); ``rows`` receives one
    judgements.jsonl line per sample."""
    by_key: dict[tuple[str, int], list[JudgeTask]] = {}
    for task in tasks:
        by_key.setdefault((task.session, task.turn), []).append(task)
    result = []
    for q in questions:
        for turn in (0, 1):
            scores, failures = [], []
            for task in sorted(by_key.get((f"q{q.question_id:04d}", turn), []), key=lambda x: x.sample):
                out = outputs.get(task.id) if task.sendable else None
                text = out.get("text") if out else None
                if protocol == "terse":
                    value = J.parse_output("mtbench", text)
                else:
                    value = J.parse_reference("mtbench", text)
                scores.append(value)
                reason = None
                if value is None:
                    reason = failure_reason(out)
                    failures.append(reason)
                if rows is not None:
                    row = {"item": f"mtbench/q{q.question_id:04d}/t{turn}", "metric": "mtbench", "sample": task.sample,
                           "id": task.id, "lang": task.lang, "raw": text, "forced": bool(out and out.get("forced")),
                           "verdict": value}
                    if reason is not None:
                        row["failure"] = reason
                    rows.append(row)
            result.append(MTBenchJudgement(q.question_id, turn, tuple(scores), tuple(failures)))
    return result
