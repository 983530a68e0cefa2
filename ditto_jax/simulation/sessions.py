"""Sessions: plan the user turns of each character's session, then assemble the SFT record.

A session belongs to one character and one partner round. Its user turns are the character's role-specific
queries (from the directed pair character -> partner; ``reject: false``) and contrastive queries (from
partner -> character: questions only the partner can answer; ``reject: true``), filtered, mixed in a seeded
order. After response simulation the record keeps the turns whose answer passed the filters; its system prompt
is only the brief intro (name + description), never the profile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ditto_jax.simulation.config import FiltersConfig, SessionsConfig
from ditto_jax.simulation.evidence import select_evidence
from ditto_jax.simulation.filters import FilterCounts, check_query
from ditto_jax.simulation.partners import Pairing, seeded_rng
from ditto_jax.simulation.queries import QueryTask

ROLE_SPECIFIC = "role_specific"
CONTRASTIVE = "contrastive"


@dataclasses.dataclass(frozen=True)
class PlannedTurn:
    """One user turn to be answered: the query, its kind, the rejection label and the evidence."""

    query: str
    kind: str
    reject: bool
    evidence: tuple[str, ...]
    evidence_from: str
    source: str

    def to_json(self) -> dict[str, Any]:
        """JSON form (stage files)."""
        return {"query": self.query, "kind": self.kind, "reject": self.reject, "evidence": list(self.evidence),
                "evidence_from": self.evidence_from, "source": self.source}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PlannedTurn":
        """Inverse of ``to_json``."""
        return cls(d["query"], d["kind"], d["reject"], tuple(d["evidence"]), d["evidence_from"], d["source"])


@dataclasses.dataclass(frozen=True)
class SessionPlan:
    """The ordered user turns of one character's session in one round."""

    id: str
    character: str
    partner: str
    round: int
    lang: str
    turns: tuple[PlannedTurn, ...]

    def turn_id(self, index: int) -> str:
        """Request id of the answer to turn ``index``."""
        return f"{self.id}/t{index:02d}"

    def to_json(self) -> dict[str, Any]:
        """JSON form (stage files)."""
        return {"id": self.id, "character": self.character, "partner": self.partner, "round": self.round,
                "lang": self.lang, "turns": [t.to_json() for t in self.turns]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SessionPlan":
        """Inverse of ``to_json``."""
        return cls(d["id"], d["character"], d["partner"], d["round"], d["lang"],
                   tuple(PlannedTurn.from_json(t) for t in d["turns"]))


def session_id(character: str, round_: int) -> str:
    """Id of a character's session in a round."""
    return f"{character}/r{round_:03d}"


def _order(role: list[PlannedTurn], contrast: list[PlannedTurn], how: str, rng: Any) -> list[PlannedTurn]:
    if how == "shuffle":
        turns = role + contrast
        rng.shuffle(turns)
        return turns
    # interleave: role-specific first, then alternate while both kinds remain
    out: list[PlannedTurn] = []
    for i in range(max(len(role), len(contrast))):
        out += role[i : i + 1] + contrast[i : i + 1]
    return out


def plan_sessions(pairings: Sequence[Pairing], questions: Mapping[str, list[str]], tasks: Mapping[tuple[int, str, str], QueryTask],
                  characters: Mapping[str, Any], sessions_cfg: SessionsConfig, filters_cfg: FiltersConfig,
                  seed: int, counts: FilterCounts) -> list[SessionPlan]:
    """Session plans for every character and round, sorted by id.

    ``questions`` maps a query task key to its parsed questions (a task missing from it failed the format
    filter). Each query is counted in ``counts`` under stage ``queries`` (kept or the drop reason).
    """
    plans = []
    for pairing in pairings:
        for cid, partner in sorted(pairing.partner.items()):
            char, other = characters[cid], characters[partner]
            seen: set[str] = set()
            groups: dict[str, list[PlannedTurn]] = {ROLE_SPECIFIC: [], CONTRASTIVE: []}
            for kind, task_key, source_char in (
                (ROLE_SPECIFIC, (pairing.round, cid, partner), char),
                (CONTRASTIVE, (pairing.round, partner, cid), other),
            ):
                task = tasks[task_key]
                for q in questions.get(task.key, []):
                    reason = check_query(q, char.lang, filters_cfg, seen)
                    counts.add(f"queries.{kind}", reason)
                    if reason is None:
                        evidence = select_evidence(q, source_char, sessions_cfg.evidence_k)
                        groups[kind].append(PlannedTurn(q, kind, kind == CONTRASTIVE, tuple(evidence),
                                                        source_char.id, task.key))
            sid = session_id(cid, pairing.round)
            rng = seeded_rng("session-order", seed, sid)
            turns = _order(groups[ROLE_SPECIFIC], groups[CONTRASTIVE], sessions_cfg.order, rng)
            plans.append(SessionPlan(sid, cid, partner, pairing.round, char.lang, tuple(turns)))
    return sorted(plans, key=lambda p: p.id)


def assemble_session(plan: SessionPlan, answers: Sequence[str | None], character: Any,
                     provenance: Mapping[str, Any]) -> dict[str, Any] | None:
    """The corpus record of a session from its plan and per-turn answers (``None`` = dropped), or ``None``.

    User turns carry ``kind``, ``reject``, ``evidence`` (and ``evidence_from``, the id of the character whose
    facts they are); the system prompt is the brief intro only.
    """
    turns: list[dict[str, Any]] = []
    for turn, answer in zip(plan.turns, answers, strict=True):
        if answer is None:
            continue
        turns.append({"role": "user", "content": turn.query, "kind": turn.kind, "reject": turn.reject,
                      "evidence": list(turn.evidence), "evidence_from": turn.evidence_from})
        turns.append({"role": "assistant", "content": answer})
    if not turns:
        return None
    return {
        "id": plan.id,
        "character": plan.character,
        "lang": plan.lang,
        "system": character.brief_intro(),
        "turns": turns,
        "label": character.label,
        "partner": plan.partner,
        "round": plan.round,
        "source": dict(provenance),
    }
