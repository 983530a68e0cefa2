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
    """One request to make: id, token ids (``None`` for an endpoint model: ``messages`` are sent), bookkeeping."""

    id: str
    input_ids: list[int] | None
    trimmed: int = 0  # history pairs dropped (answers) or text cuts made (judge) to fit the cache
    messages: list[Message] | None = None


def fit_conversation(encode: Encode | None, system: str, history: Sequence[tuple[str, str]], query: str,
                     budget: int) -> tuple[list[int] | None, int, list[Message]]:
    """Prompt ids of ``system + history + query`` within ``budget`` tokens, dropping the oldest pairs first
    (then cutting the query's tail); returns ``(ids, pairs_dropped, messages)``. Without ``encode`` (an endpoint
    model) the whole conversation is used, ids ``None``."""
    for dropped in range(len(history) + 1):
        msgs: list[Message] = [{"role": "system", "content": system}]
        for q, a in history[dropped:]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs = msgs + [{"role": "user", "content": query}]
        if encode is None:
            return None, 0, msgs
        ids = encode(msgs)
        if len(ids) <= budget:
            return ids, dropped, msgs
    text = query
    while len(text) > 1:
        text = text[: len(text) // 2]
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        ids = encode(msgs)
        if len(ids) <= budget:
            return ids, len(history) + 1, msgs
    raise ValueError(f"the system prompt alone ({system[:60]!r}...) does not fit {budget} tokens")


def answer_prompts(sessions: Sequence[EvalSession], turn: int, answers: Mapping[str, str], encode: Encode | None,
                   budget: int) -> list[Prompt]:
    """The wave of answer requests for turn position ``turn`` (sessions with that many turns).

    ``answers`` maps ``answer_request_id`` to the candidate's answer text for every earlier turn."""
    out = []
    for s in sessions:
        if turn >= len(s.turns):
            continue
        history = [(s.turns[i].prompt, answers[answer_request_id(s.id, i)]) for i in range(turn)]
        ids, dropped, msgs = fit_conversation(encode, s.system, history, s.turns[turn].prompt, budget)
        out.append(Prompt(answer_request_id(s.id, turn), ids, dropped, msgs))
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


def _judge_messages(metric: str, session: EvalSession, turn: int, answer: str, shown: Sequence[str],
                    limits: JudgeLimits, protocol: str = "reference") -> list[Message]:
    """One judge prompt. ``shown``: the candidates in this sample's (shuffled) order — names (reference) or
    terse options (name + first sentence of the description)."""
    t = session.turns[turn]
    answer = J.clip(answer, limits.answer)
    query = J.clip(t.prompt, limits.answer)
    if metric == "consistency":
        if protocol == "reference":
            return J.ref_consistency_messages(session.lang, query, answer, shown)
        return J.consistency_messages(session.lang, query, answer, shown)
    if metric == "knowledge":
        evidence, used = [], 0
        for e in t.evidence:
            if used + len(e) > limits.evidence:
                break
            evidence.append(e)
            used += len(e)
        build = J.ref_knowledge_messages if protocol == "reference" else J.knowledge_messages
        return build(session.lang, session.label, J.clip(session.summary, limits.summary), evidence, query, answer)
    if metric == "rejection":
        build = J.ref_rejection_messages if protocol == "reference" else J.rejection_messages
        return build(session.lang, session.label, query, answer)
    raise ValueError(f"unknown metric {metric!r}")


def fit_judge_prompt(build: Callable[[JudgeLimits], list[Message]], encode: Encode | None, limits: JudgeLimits,
                     budget: int) -> tuple[list[int] | None, int, list[Message] | None]:
    """Encode ``build(limits)``, halving the text budgets until it fits ``budget`` tokens; ``(None, cuts, None)``
    when it cannot fit (the caller counts those samples as unparsable, reason ``too_long``). Without ``encode``
    (an endpoint judge: its tokenizer is not here) the messages are used as built, ids ``None``."""
    cuts = 0
    while True:
        messages = build(limits)
        if encode is None:
            return None, cuts, messages
        ids = encode(messages)
        if len(ids) <= budget:
            return ids, cuts, messages
        if limits.answer <= 16 and limits.summary <= 16 and limits.evidence <= 16:
            return None, cuts, None
        limits = JudgeLimits(max(limits.answer // 2, 16), max(limits.summary // 2, 16), max(limits.evidence // 2, 16))
        cuts += 1


@dataclasses.dataclass(frozen=True)
class JudgeTask:
    """One judge request (``messages is None``: the prompt cannot fit the judge's cache; never sent).

    ``order``: the candidates as shown in this sample (``shown[i] = session.candidates[order[i]]``), drawn per
    sample from the eval seed; ``input_ids`` only for a local judge."""

    id: str
    session: str
    turn: int
    metric: str
    sample: int
    input_ids: list[int] | None
    num_options: int
    messages: list[Message] | None = None
    order: tuple[int, ...] = ()
    lang: str = "en"

    @property
    def sendable(self) -> bool:
        """Whether the prompt fits (and so was or will be sent)."""
        return self.messages is not None


def sample_order(session: EvalSession, turn: int, sample: int, seed: int) -> tuple[int, ...]:
    """The candidate order shown to judge sample ``sample`` of a turn (seeded; recorded in judgements.jsonl)."""
    return tuple(J.shuffled_order(len(session.candidates), seed, f"{session.id}/t{turn:02d}/s{sample}"))


def judge_tasks(sessions: Sequence[EvalSession], answers: Mapping[str, str], descriptions: Mapping[str, str],
                encode: Encode | None, samples: int, limits: JudgeLimits, budget: int,
                metrics: Iterable[str] = J.METRICS, protocol: str = "reference", seed: int = 0) -> list[JudgeTask]:
    """Every judge request: sessions x turns x metrics x samples. Consistency prompts differ per sample (the
    candidate order is shuffled per sample); the others are encoded once per turn and metric."""
    tasks = []
    metrics = tuple(metrics)
    for s in sessions:
        options = session_options(s, descriptions) if protocol == "terse" else list(s.candidates)
        for t in range(len(s.turns)):
            answer = answers[answer_request_id(s.id, t)]
            for metric in metrics:
                cached = None
                for k in range(samples):
                    order = sample_order(s, t, k, seed)
                    if metric == "consistency" or cached is None:
                        shown = [options[i] for i in order]
                        cached = fit_judge_prompt(
                            lambda lim, shown=shown: _judge_messages(metric, s, t, answer, shown, lim, protocol),
                            encode, limits, budget)
                    ids, _, messages = cached
                    tasks.append(JudgeTask(judge_request_id(s.id, t, metric, k), s.id, t, metric, k, ids,
                                           len(options), messages, order, s.lang))
    return tasks


def failure_reason(output: Mapping[str, Any] | None) -> str:
    """Why a judge sample did not parse: ``too_long`` (never sent), ``error`` (an endpoint that failed after its
    retries), ``length`` (cut by max_new_tokens) or ``no_match``."""
    if output is None:
        return "too_long"
    if output.get("error"):
        return "error"
    return "length" if output.get("finish_reason") == "length" else "no_match"


def parse_task(task: JudgeTask, text: str | None, protocol: str, candidates: Sequence[str]) -> Any:
    """A judge output parsed for its task; consistency verdicts map back from the shown order to the index in
    ``candidates`` (``-1``: a name not among them)."""
    if text is None:
        return None
    if protocol == "terse":
        value = J.parse_output(task.metric, text, task.num_options)
        if task.metric == "consistency" and value is not None and task.order:
            value = task.order[value]
        return value
    shown = [candidates[i] for i in task.order] if task.order else list(candidates)
    value = J.parse_reference(task.metric, text, task.lang, shown)
    if task.metric == "consistency" and value is not None and value >= 0 and task.order:
        value = task.order[value]
    return value


def collect_judgements(sessions: Sequence[EvalSession], tasks: Sequence[JudgeTask],
                       outputs: Mapping[str, Mapping[str, Any]], protocol: str = "reference",
                       rows: list[dict[str, Any]] | None = None) -> list[TurnJudgement]:
    """Parse every judge output into per-turn ``TurnJudgement``s (``outputs`` maps request id to the output
    record; a task missing there is a prompt that was never sent). ``rows`` (when given) receives one
    judgements.jsonl line per sample: item, metric, sample, shown candidate order, raw text, verdict or why not."""
    by_id = {s.id: s for s in sessions}
    parsed: dict[tuple[str, int, str], list[Any]] = {}
    failures: dict[tuple[str, int], dict[str, list[str]]] = {}
    for task in sorted(tasks, key=lambda x: (x.session, x.turn, x.metric, x.sample)):
        session = by_id[task.session]
        out = outputs.get(task.id) if task.sendable else None
        text = out.get("text") if out else None
        value = parse_task(task, text, protocol, session.candidates)
        parsed.setdefault((task.session, task.turn, task.metric), []).append(value)
        reason = None
        if value is None:
            reason = failure_reason(out)
            failures.setdefault((task.session, task.turn), {}).setdefault(task.metric, []).append(reason)
        if rows is not None:
            row: dict[str, Any] = {"item": f"{task.session}/t{task.turn:02d}", "session": task.session,
                                   "turn": task.turn, "lang": task.lang, "metric": task.metric,
                                   "sample": task.sample, "id": task.id}
            if task.metric == "consistency":
                row["candidates_shown"] = [session.candidates[i] for i in task.order] if task.order else list(
                    session.candidates)
                row["true_role"] = session.label
                if value is not None:
                    row["chosen"] = session.candidates[value] if value >= 0 else None
            if task.metric == "rejection":
                row["label"] = session.turns[task.turn].reject
            row["raw"] = text
            row["forced"] = bool(out and out.get("forced"))
            row["verdict"] = value
            if reason is not None:
                row["failure"] = reason
            rows.append(row)
    result = []
    for s in sessions:
        for t, turn in enumerate(s.turns):
            get = lambda m: tuple(parsed.get((s.id, t, m), ()))  # noqa: E731
            result.append(TurnJudgement(
                session=s.id, turn=t, lang=s.lang, reject_label=turn.reject, answer_index=s.answer_index,
                consistency=get("consistency"), knowledge=get("knowledge"), rejection=get("rejection"),
                failures={m: tuple(v) for m, v in failures.get((s.id, t), {}).items()}))
    return result
