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


def answer_prompts(questions: Sequence[MTBenchQuestion], turn: int, answers: Mapping[str, str], encode: Encode,
                   budget: int) -> list[Prompt]:
    """Answer requests for ``turn``; turn 1 includes the question's first turn and the candidate's first answer
    (dropped, counted in ``trimmed``, if the conversation does not fit)."""
    out = []
    for q in questions:
        msgs: list[dict[str, str]] = []
        if turn == 1:
            msgs = [{"role": "user", "content": q.turns[0]},
                    {"role": "assistant", "content": answers[answer_request_id(q.question_id, 0)]}]
        ids = encode(msgs + [{"role": "user", "content": q.turns[turn]}])
        trimmed = 0
        if len(ids) > budget and msgs:
            ids, trimmed = encode([{"role": "user", "content": q.turns[turn]}]), 1
        text = q.turns[turn]
        while len(ids) > budget and len(text) > 1:
            text = text[: len(text) // 2]
            ids, trimmed = encode([{"role": "user", "content": text}]), trimmed + 1
        out.append(Prompt(answer_request_id(q.question_id, turn), ids, trimmed))
    return out


def judge_tasks(questions: Sequence[MTBenchQuestion], answers: Mapping[str, str], encode: Encode, samples: int,
                limits: JudgeLimits, budget: int) -> list[JudgeTask]:
    """Judge requests for both turns of every question, ``samples`` each."""
    tasks = []
    for q in questions:
        for turn in (0, 1):
            def build(lim: JudgeLimits, q: MTBenchQuestion = q, turn: int = turn) -> list[dict[str, str]]:
                replies = [J.clip(answers[answer_request_id(q.question_id, i)], lim.answer) for i in range(turn + 1)]
                return J.mtbench_messages([J.clip(t, lim.summary) for t in q.turns], replies, turn)

            ids, _ = fit_judge_prompt(build, encode, limits, budget)
            for k in range(samples):
                tasks.append(JudgeTask(judge_request_id(q.question_id, turn, k), f"q{q.question_id:04d}", turn,
                                       "mtbench", k, ids, 0))
    return tasks


def collect_judgements(questions: Sequence[MTBenchQuestion], tasks: Sequence[JudgeTask],
                       outputs: Mapping[str, Mapping[str, Any]]) -> list[MTBenchJudgement]:
    """Parse the judge outputs into one ``MTBenchJudgement`` per (question, turn)."""
    by_key: dict[tuple[str, int], list[JudgeTask]] = {}
    for task in tasks:
        by_key.setdefault((task.session, task.turn), []).append(task)
    result = []
    for q in questions:
        for turn in (0, 1):
            scores, failures = [], []
            for task in sorted(by_key.get((f"q{q.question_id:04d}", turn), []), key=lambda x: x.sample):
                out = outputs.get(task.id) if task.input_ids is not None else None
                value = J.parse_output("mtbench", out.get("text") if out else None)
                scores.append(value)
                if value is None:
                    failures.append(failure_reason(out))
            result.append(MTBenchJudgement(q.question_id, turn, tuple(scores), tuple(failures)))
    return result
