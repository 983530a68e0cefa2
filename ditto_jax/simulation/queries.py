"""Query simulation: prompts per directed pair, the JSON schema that constrains decoding, and parsing.

A directed pair ``(round, a, b)`` asks the supervision model for questions ``a`` can answer but ``b`` cannot;
they become role-specific queries of ``a``'s session and contrastive (to be refused) queries of ``b``'s session.
Decoding is constrained by ``question_schema`` so a finished output always parses; an output cut by
``max_new_tokens`` does not, and is resampled (the paper's "sample 3 times, keep a valid one") under a new
request id, hence a new seed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from ditto_jax.simulation.prompts import Message, ProfileBudget, query_messages


@dataclasses.dataclass(frozen=True)
class QueryTask:
    """One directed pair: the prompt asking for questions ``asker`` can answer and ``other`` cannot."""

    round: int
    asker: str
    other: str
    lang: str

    @property
    def key(self) -> str:
        """Stable id of the pair, ordered like the tuple ``(round, asker, other)`` for ids without '/'."""
        return f"r{self.round:03d}/{self.asker}/{self.other}"

    def request_id(self, attempt: int) -> str:
        """Request id of one attempt (the sampler seeds each request from its id)."""
        return f"{self.key}/a{attempt}"


def question_schema(n: int, min_chars: int, max_chars: int) -> dict[str, Any]:
    """JSON schema of exactly ``n`` objects ``{"question": str}`` with bounded string length."""
    return {
        "type": "array",
        "minItems": n,
        "maxItems": n,
        "items": {
            "type": "object",
            "properties": {"question": {"type": "string", "minLength": min_chars, "maxLength": max_chars}},
            "required": ["question"],
            "additionalProperties": False,
        },
    }


def build_tasks(pairs: Sequence[tuple[int, str, str]], characters: Mapping[str, Any]) -> list[QueryTask]:
    """Tasks for directed pairs; the prompt language is the asker's language."""
    return [QueryTask(r, a, b, characters[a].lang) for r, a, b in pairs]


def task_messages(task: QueryTask, characters: Mapping[str, Any], n: int, budget: ProfileBudget) -> list[Message]:
    """Chat messages of a task's query prompt."""
    return query_messages(characters[task.asker], characters[task.other], n, task.lang, budget)


def parse_questions(text: str, n: int) -> list[str] | None:
    """The questions of an output ``[{"question": ...}, ...]``, or ``None`` when it is not exactly that shape."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(data, list) or len(data) != n:
        return None
    out = []
    for item in data:
        if not isinstance(item, dict) or set(item) != {"question"} or not isinstance(item["question"], str):
            return None
        out.append(item["question"].strip())
    return out
