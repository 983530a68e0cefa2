"""WikiRoleEval: multi-turn candidate answering and per-turn judge requests, and turning judge outputs into
``TurnJudgement``s.

Answering runs in waves, one per turn position: wave ``t`` asks every session's turn ``t`` with the conversation so
far (system prompt = the session's brief intro, then the earlier prompts with the candidate's *own* earlier
answers). When a conversation does not fit the engine's cache, the oldest (prompt, answer) pairs are dropped
(counted as ``history_trimmed``); a single prompt that cannot fit even alone is cut from its end.

Judging asks ``samples`` independent judgements per turn and metric (distinct request ids, hence distinct seeds).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

from ditto_jax.eval import judge as J
from ditto_jax.eval.metrics import TurnJudgement
from ditto_jax.eval.testsets import EvalSession

Message = dict[str, str]
Encode = Callable[[Sequence[Message]], list[int]]


def answer_request_id(session_id: str, turn: int) -> str:
    """Request id of the candidate's answer to ``turn`` of a session."""
    return f"{session_id}/t{turn:02d}"


def judge_request_id(session_id: str, turn: int, metric: str, sample: int) -> str:
    """Request id of one judge sample."""
    return f"{session_id}/t{turn:02d}/{metric}/s{sample}"


def chat_encoder(tokenizer: Any) -> Encode:
    """``messages -> prompt ids`` ending with the assistant generation prompt."""
    return lambda messages: tokenizer.encode_chat(list(messages), add_generation_prompt=True)[0]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request to make: id, token ids, and bookkeeping."""

    id: str
    input_ids: list[int]
    trimmed: int = 0  # history pairs dropped (answers) or text cuts made (judge) to fit the cache


def fit_conversation(encode: Encode, system: str, history: Sequence[tuple[str, str]], query: str,
                     budget: int) -> tuple[list[int], int]:
    """Prompt ids of ``system + history + query`` within ``budget`` tokens, dropping the oldest pairs first
    (then cutting the query's tail); returns ``(ids, pairs_dropped)``."""
    for dropped in range(len(history) + 1):
        msgs: list[Message] = [{"role": "system", "content": system}]
        for q, a in history[dropped:]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids = encode(msgs + [{"role": "user", "content": query}])
        if len(ids) <= budget:
            return ids, dropped
    text = query
    while len(text) > 1:
        text = text[: len(text) // 2]
        ids = encode([{"role": "system", "content": system}, {"role": "user", "content": text}])
        if len(ids) <= budget:
            return ids, len(history) + 1
    raise ValueError(f"the system prompt alone ({system[:60]!r}...) does not fit {budget} tokens")


def answer_prompts(sessions: Sequence[EvalSession], turn: int, answers: Mapping[str, str], encode: Encode,
                   budget: int) -> list[Prompt]:
    """The wave of answer requests for turn position ``turn`` (sessions with that many turns).

    ``answers`` maps ``answer_request_id`` to the candidate's answer text for every earlier turn."""
    out = []
    for s in sessions:
        if turn >= len(s.turns):
            continue
        history = [(s.turns[i].prompt, answers[answer_request_id(s.id, i)]) for i in range(turn)]
        ids, dropped = fit_conversation(encode, s.system, history, s.turns[turn].prompt, budget)
        out.append(Prompt(answer_request_id(s.id, turn), ids, dropped))
    return out


def session_options(session: EvalSession, descriptions: Mapping[str, str]) -> list[str]:
    """The multiple-choice options: each candidate as name + first sentence of its description (from the
    knowledge base by label/alias; for the true role also the record's own description), else the name."""
    out = []
    for cand in session.candidates:
        desc = descriptions.get(cand)
        if desc is None and cand == session.label:
            desc = session.description
        out.append(J.option_text(cand, desc))
    return out


@dataclasses.dataclass(frozen=True)
class JudgeLimits:
    """Character budgets for text placed in judge prompts."""

    answer: int = 2000
    summary: int = 1500
    evidence: int = 1500


def _judge_messages(metric: str, session: EvalSession, turn: int, answer: str, options: Sequence[str],
                    limits: JudgeLimits) -> list[Message]:
    t = session.turns[turn]
    answer = J.clip(answer, limits.answer)
    if metric == "consistency":
        return J.consistency_messages(session.lang, J.clip(t.prompt, limits.answer), answer, options)
    if metric == "knowledge":
        evidence, used = [], 0
        for e in t.evidence:
            if used + len(e) > limits.evidence:
                break
            evidence.append(e)
            used += len(e)
        return J.knowledge_messages(session.lang, session.label, J.clip(session.summary, limits.summary), evidence,
                                    J.clip(t.prompt, limits.answer), answer)
    if metric == "rejection":
        return J.rejection_messages(session.lang, session.label, J.clip(t.prompt, limits.answer), answer)
    raise ValueError(f"unknown metric {metric!r}")


def fit_judge_prompt(build: Callable[[JudgeLimits], list[Message]], encode: Encode, limits: JudgeLimits,
                     budget: int) -> tuple[list[int] | None, int]:
    """Encode ``build(limits)``, halving the text budgets until it fits ``budget`` tokens; ``(None, cuts)`` when it
    cannot fit (the caller counts those samples as unparsable, reason ``too_long``)."""
    cuts = 0
    while True:
        ids = encode(build(limits))
        if len(ids) <= budget:
            return ids, cuts
        if limits.answer <= 16 and limits.summary <= 16 and limits.evidence <= 16:
            return None, cuts
        limits = JudgeLimits(max(limits.answer // 2, 16), max(limits.summary // 2, 16), max(limits.evidence // 2, 16))
        cuts += 1


@dataclasses.dataclass(frozen=True)
class JudgeTask:
    """One judge request of a WikiRoleEval turn (``input_ids is None``: the prompt cannot fit; not sent)."""

    id: str
    session: str
    turn: int
    metric: str
    sample: int
    input_ids: list[int] | None
    num_options: int


def judge_tasks(sessions: Sequence[EvalSession], answers: Mapping[str, str], descriptions: Mapping[str, str],
                encode: Encode, samples: int, limits: JudgeLimits, budget: int,
                metrics: Iterable[str] = J.METRICS) -> list[JudgeTask]:
    """Every judge request: sessions x turns x metrics x samples (the prompt is encoded once per turn/metric)."""
    tasks = []
    metrics = tuple(metrics)
    for s in sessions:
        options = session_options(s, descriptions)
        for t in range(len(s.turns)):
            answer = answers[answer_request_id(s.id, t)]
            for metric in metrics:
                ids, _ = fit_judge_prompt(lambda lim: _judge_messages(metric, s, t, answer, options, lim), encode,
                                          limits, budget)
                for k in range(samples):
                    tasks.append(JudgeTask(judge_request_id(s.id, t, metric, k), s.id, t, metric, k, ids,
                                           len(options)))
    return tasks


def failure_reason(output: Mapping[str, Any] | None) -> str:
    """Why a judge sample did not parse: ``too_long`` (never sent), ``length`` (cut by max_new_tokens) or
    ``no_match``."""
    if output is None:
        return "too_long"
    return "length" if output.get("finish_reason") == "length" else "no_match"


def collect_judgements(sessions: Sequence[EvalSession], tasks: Sequence[JudgeTask],
                       outputs: Mapping[str, Mapping[str, Any]]) -> list[TurnJudgement]:
    """Parse every judge output into per-turn ``TurnJudgement``s (``outputs`` maps request id to the runner's
    output record; a task missing there is a prompt that was never sent)."""
    parsed: dict[tuple[str, int, str], list[int | None]] = {}
    failures: dict[tuple[str, int], dict[str, list[str]]] = {}
    for task in sorted(tasks, key=lambda x: (x.session, x.turn, x.metric, x.sample)):
        out = outputs.get(task.id) if task.input_ids is not None else None
        value = J.parse_output(task.metric, out.get("text") if out else None, task.num_options)
        parsed.setdefault((task.session, task.turn, task.metric), []).append(value)
        if value is None:
            failures.setdefault((task.session, task.turn), {}).setdefault(task.metric, []).append(failure_reason(out))
    result = []
    for s in sessions:
        for t, turn in enumerate(s.turns):
            get = lambda m: tuple(parsed.get((s.id, t, m), ()))  # noqa: E731
            result.append(TurnJudgement(
                session=s.id, turn=t, lang=s.lang, reject_label=turn.reject, answer_index=s.answer_index,
                consistency=get("consistency"), knowledge=get("knowledge"), rejection=get("rejection"),
                failures={m: tuple(v) for m, v in failures.get((s.id, t), {}).items()}))
    return result
