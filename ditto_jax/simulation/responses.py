"""Response simulation: one in-character answer per planned user turn.

``independent`` (the paper): every query is answered from the profile alone, so all turns of all sessions are
one batch of requests. ``dialogue``: turn ``i`` also sees the session's earlier kept (query, answer) pairs, so
the stage runs in waves, one per turn position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ditto_jax.simulation.prompts import Message, ProfileBudget, response_messages
from ditto_jax.simulation.sessions import SessionPlan


@dataclasses.dataclass(frozen=True)
class ResponseTask:
    """The answer to turn ``index`` of session ``plan``."""

    plan: SessionPlan
    index: int

    @property
    def request_id(self) -> str:
        """Request id (the sampler seeds the request from it)."""
        return self.plan.turn_id(self.index)


def response_tasks(plans: Sequence[SessionPlan], wave: int | None = None) -> list[ResponseTask]:
    """Tasks of all turns (``wave=None``) or of turn position ``wave`` only, sorted by request id."""
    tasks = [ResponseTask(p, i) for p in plans for i in range(len(p.turns)) if wave is None or i == wave]
    return sorted(tasks, key=lambda t: t.request_id)


def task_messages(task: ResponseTask, characters: Mapping[str, Any], history: Sequence[tuple[str, str]],
                  budget: ProfileBudget) -> list[Message]:
    """Messages for the answer: profile system prompt, optional history, the query."""
    character = characters[task.plan.character]
    return response_messages(character, task.plan.turns[task.index].query, history, budget)
