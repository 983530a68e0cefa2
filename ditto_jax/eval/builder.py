"""Build a WikiRoleEval test set from held-out characters with the Ditto simulation.

``ditto-jax eval build-testset --config configs/eval/testset-tiny.yaml --workdir DIR`` runs the simulation
(query simulation -> response simulation -> sessions, with the configured ``supervision_model``, ideally stronger
than the models under test) on the *held-out* characters into ``DIR/simulation``, then turns every simulated
session into a WikiRoleEval record (``DIR/wikiroleeval.jsonl``, the layout ``ditto_jax.eval.testsets`` loads):

* ``prompts`` = the session's user turns (its simulated answers are not kept: candidates answer afresh);
* ``meta.rejection_labels`` = the turns' ``reject`` labels (contrastive queries from the partner: 1);
* ``meta.evidence`` = the turns' evidence (the profile facts each query draws on);
* ``meta.role_consist_cands`` = the true role + ``num_candidates - 1`` distractors drawn (seeded by the session
  id) from the knowledge base, same language first, at a random position;
* ``meta.summary`` from the knowledge base.

Sessions with fewer than ``min_turns`` user turns are dropped (counted in ``DIR/testset_report.json``).
Re-running resumes the simulation and rewrites the test set atomically.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Mapping, Sequence

import pydantic

from ditto_jax.config import ConfigError, StrictModel, validate
from ditto_jax.data.characters import load_characters
from ditto_jax.data.corpus import read_sessions
from ditto_jax.eval.testsets import EvalSession, EvalTurn, session_to_json
from ditto_jax.fileio import atomic_write_json, atomic_write_jsonl
from ditto_jax.simulation.config import SimulateConfig
from ditto_jax.simulation.partners import seeded_rng
from ditto_jax.simulation.stages import Simulation


class BuildTestSetConfig(StrictModel):
    """``simulation``: a ``ditto-jax simulate`` config (``characters.split`` must be ``heldout``; its
    ``supervision_model`` writes the queries). ``num_candidates``: options of the identity multiple choice."""

    simulation: dict[str, Any]
    num_candidates: int = pydantic.Field(4, ge=2, le=26)
    min_turns: int = pydantic.Field(2, ge=1)
    max_turns: int | None = pydantic.Field(None, ge=1)
    seed: int = 0


def pick_candidates(character: Any, characters: Sequence[Any], k: int, seed: int, session_id: str) -> list[str]:
    """The true role's label and ``k - 1`` distractor labels (same language preferred), shuffled; seeded by
    ``(seed, session_id)`` so a rebuild gives the same options."""

    rng = seeded_rng("wre-candidates", seed, session_id)
    others = sorted({c.label for c in characters if c.id != character.id and c.label != character.label})
    same = [lab for lab in others if any(c.label == lab and c.lang == character.lang for c in characters)]
    rest = [lab for lab in others if lab not in same]
    rng.shuffle(same)
    rng.shuffle(rest)
    distractors = (same + rest)[: k - 1]
    if len(distractors) < k - 1:
        raise ValueError(f"the knowledge base has {len(others)} other roles; {k - 1} distractors are needed")
    options = [character.label, *distractors]
    rng.shuffle(options)
    return options


def session_to_eval(session: Any, characters: Mapping[str, Any], k: int, seed: int,
                    max_turns: int | None = None) -> EvalSession:
    """A simulated corpus session (``ditto_jax.data.corpus.Session``) as a WikiRoleEval ``EvalSession``."""
    char = characters[session.character]
    user_turns = [t for t in session.turns if t.role == "user"][: max_turns or None]
    turns = tuple(EvalTurn(prompt=t.content, reject=int(bool(t.reject)), evidence=tuple(t.evidence or ()))
                  for t in user_turns)
    cands = pick_candidates(char, list(characters.values()), k, seed, session.id)
    return EvalSession(id=f"wre-{session.id}", system=session.system, label=char.label, character=char.id,
                       lang=session.lang, candidates=tuple(cands), summary=char.summary, description=char.description,
                       turns=turns)


def convert_corpus(sessions: Sequence[Any], characters: Sequence[Any], cfg: BuildTestSetConfig) -> tuple[
        list[EvalSession], dict[str, Any]]:
    """Every usable session as an ``EvalSession`` plus counts (kept, dropped by reason, turns by label/lang)."""
    by_id = {c.id: c for c in characters}
    out: list[EvalSession] = []
    dropped: collections.Counter = collections.Counter()
    for s in sessions:
        if s.character not in by_id:
            dropped["unknown_character"] += 1
            continue
        ev = session_to_eval(s, by_id, cfg.num_candidates, cfg.seed, cfg.max_turns)
        if len(ev.turns) < cfg.min_turns:
            dropped["too_few_turns"] += 1
            continue
        out.append(ev)
    turns = [t for s in out for t in s.turns]
    stats = {"sessions": len(out), "dropped": dict(dropped), "turns": len(turns),
             "reject_turns": sum(t.reject for t in turns),
             "by_lang": dict(collections.Counter(s.lang for s in out)),
             "turns_without_evidence": sum(not t.evidence for t in turns)}
    return out, stats


def build_testset(cfg: BuildTestSetConfig, workdir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Simulate the held-out characters (resumable) and write ``workdir/wikiroleeval.jsonl``; returns the counts."""

    workdir = Path(workdir)
    data = dict(cfg.simulation)
    data["corpus"] = {**(data.get("corpus") or {}), "tfds": False, "validation_fraction": 0.0}
    sim_cfg = validate(SimulateConfig, data, "build-testset: simulation")
    if sim_cfg.characters.split != "heldout":
        raise ConfigError("build-testset: simulation.characters.split must be 'heldout' (test roles are held out "
                          "of training)")
    report = Simulation(sim_cfg, workdir / "simulation", progress=progress).run()
    sessions, read = read_sessions(workdir / "simulation" / "corpus")
    characters = load_characters(sim_cfg.characters.path)
    evals, stats = convert_corpus(sessions, characters, cfg)
    if not evals:
        raise ValueError(f"the simulation produced no usable session (see {workdir / 'simulation'}"
                         f"/simulation_report.json)")
    path = workdir / "wikiroleeval.jsonl"
    atomic_write_jsonl(path, [session_to_json(s) for s in evals])
    summary = {"path": str(path), **stats, "corpus": read.to_dict(),
               "supervision_model": sim_cfg.supervision_model.describe(),
               "simulation_dropped": report.get("dropped_by_reason", {})}
    atomic_write_json(workdir / "testset_report.json", summary)
    return summary
