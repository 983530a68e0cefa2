"""The simulation pipeline as resumable stages: queries -> responses -> sessions -> corpus.

Layout of ``WORKDIR``::

    config.yaml                  the resolved config of the first run (a re-run must match it)
    seed_model.yaml              the seed-model entry, for the SFT config (cross-supervision)
    stages/queries/attempt-K/    sampling-runner output of query attempt K (exactly-once, resumable)
    stages/queries.jsonl         parsed questions per directed pair
    stages/plans.jsonl           session plans (ordered user turns with kind, label, evidence)
    stages/responses/all/        runner output of the answers (``dialogue``: wave-00, wave-01, ...)
    stages/responses.jsonl       every answer with its filter verdict
    endpoint_cache/              an endpoint supervision model's journal (answers never asked twice)
    stages/sessions.jsonl        the assembled sessions
    corpus/sessions-*.jsonl      the corpus (DESIGN.md contract), written atomically as one folder
    tfds/                        the same corpus as a TFDS array_record dataset (train/validation)
    simulation_report.json

Generation goes through the sampling runner, which makes every request's output exist exactly once however
often the run is killed; everything after it is a pure function of those outputs (sorted by id, seeded per
request), so a resumed run ends with the same bytes as an uninterrupted one. Multi-host: every process loads
the supervision model on its own devices and generates for its share of characters (character index modulo
the process count); processes meet at file barriers in the shared ``WORKDIR`` and process 0 writes the
derived files.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import yaml

from ditto_jax.config import ConfigError, dump_config, reread_config
from ditto_jax.data.characters import load_characters
from ditto_jax.data.corpus import build_corpus, parse_session, write_shards
from ditto_jax.fileio import atomic_directory, atomic_write_json, atomic_write_jsonl, atomic_write_text
from ditto_jax.simulation import queries as Q
from ditto_jax.simulation import responses as R
from ditto_jax.simulation.backend import make_backend, read_outputs, stage_complete
from ditto_jax.simulation.config import SimulateConfig
from ditto_jax.simulation.filters import FilterCounts, check_response
from ditto_jax.simulation.partners import Pairing, assign_partners, directed_pairs
from ditto_jax.simulation.report import build_report
from ditto_jax.simulation.sessions import SessionPlan, assemble_session, plan_sessions

Log = Callable[[str], None]

# Config sections that decide the output; a re-run in the same workdir must not change them. The rest of
# ``engine`` (slots, mesh, devices) may change: per-request seeds make outputs independent of batching. So may
# an endpoint's transport settings (concurrency, retries, timeout, the key's variable).
OUTPUT_SECTIONS = ("seed", "supervision_model", "characters", "partners", "queries", "responses", "filters",
                   "sessions", "corpus", "engine.max_len")
_ENDPOINT_TRANSPORT = ("concurrency", "max_retries", "timeout", "api_key_env")


def _output_config(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k in OUTPUT_SECTIONS}
    out["engine.max_len"] = (data.get("engine") or {}).get("max_len")  # decides how prompts are shortened
    sup = out.get("supervision_model")
    if isinstance(sup, dict) and "endpoint" in sup:
        out["supervision_model"] = {k: v for k, v in sup.items() if k not in _ENDPOINT_TRANSPORT}
    return out


def select_characters(cfg: SimulateConfig) -> list[Any]:
    """The characters to simulate, sorted by id: the knowledge base filtered by split, language, ids, limit."""

    sel = cfg.characters
    chars = sorted(load_characters(sel.path), key=lambda c: c.id)
    if sel.split != "all":
        chars = [c for c in chars if c.split == sel.split]
    chars = [c for c in chars if c.lang in sel.langs]
    if sel.ids:
        known = {c.id for c in chars}
        missing = [i for i in sel.ids if i not in known]
        if missing:
            raise ConfigError(f"characters.ids: not in the selected knowledge base: {missing}")
        chars = [c for c in chars if c.id in set(sel.ids)]
    if sel.limit_per_lang is not None:
        per_lang: dict[str, int] = collections.Counter()
        kept = []
        for c in chars:
            if per_lang[c.lang] < sel.limit_per_lang:
                kept.append(c)
                per_lang[c.lang] += 1
        chars = kept
    if len(chars) < 2:
        raise ConfigError(f"characters: {len(chars)} selected, simulation needs at least 2")
    return chars


class Simulation:
    """One simulation run over ``WORKDIR`` (re-running resumes). ``run()`` returns the report."""

    def __init__(self, cfg: SimulateConfig, workdir: str | Path, *, log: Log = print, progress: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.stages = self.workdir / "stages"
        self.log = log
        self.progress = progress
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        self.process_index, self.process_count = process_index, process_count
        self.counts = FilterCounts()
        self.stage_stats: dict[str, dict[str, Any]] = {}
        self._backend: Any = None

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    @property
    def is_writer(self) -> bool:
        """Whether this process writes the derived files (process 0)."""
        return self.process_index == 0

    def _check_workdir(self) -> None:
        """Record the config on the first run; refuse a re-run whose output-deciding config differs."""
        path = self.workdir / "config.yaml"
        current = _output_config(self.cfg.model_dump(mode="json"))
        if path.exists():
            text = path.read_text(encoding="utf-8")
            old = reread_config(type(self.cfg), text)  # a file written before a defaulted field was added matches
            stored = _output_config(old.model_dump(mode="json") if old is not None else yaml.safe_load(text) or {})
            if stored != current:
                diff = sorted(k for k in OUTPUT_SECTIONS if stored.get(k) != current.get(k))
                raise ConfigError(f"{self.workdir} was simulated with a different config (sections {diff} differ); "
                                  "use a new --workdir or the original config")
        elif self.is_writer:
            atomic_write_text(path, dump_config(self.cfg))
            atomic_write_text(self.workdir / "seed_model.yaml", dump_config(self.cfg.seed_model))

    def _mine(self, character_id: str) -> bool:
        return self._owner[character_id] == self.process_index

    def _barrier(self, name: str) -> None:
        """Wait until every process has passed ``name`` (marker files in the shared workdir)."""
        if self.process_count == 1:
            return
        marks = self.stages / "barriers"
        n = self.process_count
        atomic_write_text(marks / f"{name}.{self.process_index}-of-{n}", "")
        while not all((marks / f"{name}.{i}-of-{n}").exists() for i in range(n)):
            time.sleep(1.0)

    # ---- generation backend (supervision model, loaded only when a stage has work left) ------------------
    def _load_backend(self) -> Any:
        if self._backend is None:
            self.log(f"loading supervision model: {self.cfg.supervision_model.describe()}")
            self._backend = make_backend(self.cfg, self.workdir, self.process_index, log=self.log,
                                         progress=self.progress)
        return self._backend

    def _generate(self, name: str, out_dir: Path, build: Callable[[Any], list[Any]]) -> dict[str, dict[str, Any]]:
        """Run this process's requests of one generation stage through the runner; return every process's outputs.

        ``build(backend)`` returns this process's requests (the backend's kind: token ids or chat messages); it is
        only called when outputs are missing.
        """
        start = time.perf_counter()
        if not stage_complete(out_dir, self.process_index, self.process_count):
            backend = self._load_backend()
            requests = build(backend)
            backend.run(out_dir, requests, self.process_index, self.process_count, desc=name)
            self.stage_stats.setdefault(name, {}).update(backend.last_stats)
            self.stage_stats[name].update(backend.prompt_stats(requests))
        self._barrier(name)
        outputs = read_outputs(out_dir)
        self.stage_stats.setdefault(name, {})["stage_seconds"] = round(time.perf_counter() - start, 2)
        return outputs

    # ---- stages ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage and return the report (also written to ``simulation_report.json``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_workdir()
        cfg = self.cfg
        characters = select_characters(cfg)
        self.characters = {c.id: c for c in characters}
        self._owner = {c.id: i % self.process_count for i, c in enumerate(characters)}
        pairings = assign_partners(characters, cfg.partners.rounds, cfg.partners.strategy, cfg.seed,
                                   cfg.partners.same_language)
        self.log(f"simulate: {len(characters)} characters, {cfg.partners.rounds} round(s), "
                 f"{cfg.partners.strategy} partners; supervision {cfg.supervision_model.describe()}, "
                 f"seed model {cfg.seed_model.describe()}")
        self.log("[1/4] queries")
        questions = self.query_stage(pairings)
        tasks = {(t.round, t.asker, t.other): t for t in Q.build_tasks(directed_pairs(pairings), self.characters)}
        plans = plan_sessions(pairings, questions, tasks, self.characters, cfg.sessions, cfg.filters, cfg.seed,
                              self.counts)
        if self.is_writer:
            atomic_write_jsonl(self.stages / "plans.jsonl", [p.to_json() for p in plans])
        self.log("[2/4] responses")
        answers = self.response_stage(plans)
        self.log("[3/4] sessions")
        sessions = self.session_stage(plans, answers)
        self.log("[4/4] corpus")
        corpus = self.corpus_stage(sessions) if self.is_writer else {}

        report = build_report(self, characters, pairings, plans, sessions, corpus)
        if self.is_writer:
            atomic_write_json(self.workdir / "simulation_report.json", report)
        return report

    def query_stage(self, pairings: Sequence[Pairing]) -> dict[str, list[str]]:
        """Questions per directed-pair key; unparsable outputs resampled up to ``queries.attempts`` times."""
        cfg = self.cfg.queries
        tasks = Q.build_tasks(directed_pairs(pairings), self.characters)
        schema = Q.question_schema(cfg.num_questions, cfg.min_question_chars, cfg.max_question_chars)
        parsed: dict[str, list[str]] = {}
        attempts_used: dict[str, int] = {}
        too_long: set[str] = set()
        last_failure: dict[str, str] = {}  # why a task's latest attempt did not parse
        failures: collections.Counter = collections.Counter()  # failed attempts by reason, all attempts
        pending = list(tasks)
        for attempt in range(cfg.attempts):
            if not pending:
                break
            mine = [t for t in pending if self._mine(t.asker)]

            def build(backend: Any, mine: list[Q.QueryTask] = mine, attempt: int = attempt) -> list[Any]:
                constraint = backend.json_constraint(schema)
                out = []
                for t in mine:
                    ids = backend.fit(lambda b, t=t: Q.task_messages(t, self.characters, cfg.num_questions, b),
                                      cfg.max_profile_chars, cfg.sampling.max_new_tokens)
                    if ids is None:
                        continue
                    out.append(backend.request(t.request_id(attempt), ids, cfg.sampling, self.cfg.seed, constraint))
                return out

            name = f"queries.attempt{attempt + 1}"
            outputs = self._generate(name, self.stages / "queries" / f"attempt-{attempt}", build)
            still = []
            for t in pending:
                out = outputs.get(t.request_id(attempt))
                if out is None:  # the prompt did not fit even with the smallest profile
                    too_long.add(t.key)
                    continue
                qs = None if out.get("error") else Q.parse_questions(out["text"] or "", cfg.num_questions)
                if qs is None:
                    last_failure[t.key] = "endpoint_error" if out.get("error") else "format"
                    failures[last_failure[t.key]] += 1
                    still.append(t)
                else:
                    parsed[t.key], attempts_used[t.key] = qs, attempt + 1
            pending = still
        for t in tasks:
            self.counts.add("query_prompts", None if t.key in parsed else
                            ("prompt_too_long" if t.key in too_long else last_failure.get(t.key, "format")))
        self.stage_stats.setdefault("queries", {})["attempts_used"] = dict(
            sorted(collections.Counter(attempts_used.values()).items()))
        self.stage_stats["queries"]["failed_attempts"] = dict(sorted(failures.items()))
        if self.is_writer:
            atomic_write_jsonl(self.stages / "queries.jsonl", [
                {"key": t.key, "asker": t.asker, "other": t.other, "round": t.round, "lang": t.lang,
                 "questions": parsed.get(t.key), "attempts": attempts_used.get(t.key)} for t in tasks])
        return parsed

    def response_stage(self, plans: Sequence[SessionPlan]) -> dict[str, str | None]:
        """Kept answer text (or ``None`` when filtered) for every planned turn, keyed by turn request id."""
        cfg = self.cfg.responses
        kept: dict[str, str | None] = {}
        records: list[dict[str, Any]] = []
        waves: list[int | None] = [None] if cfg.context == "independent" else list(
            range(max((len(p.turns) for p in plans), default=0)))
        for wave in waves:
            tasks = R.response_tasks(plans, wave)
            mine = [t for t in tasks if self._mine(t.plan.character)]

            def build(backend: Any, mine: list[R.ResponseTask] = mine) -> list[Any]:
                out = []
                for t in mine:
                    history = [(p.query, kept[t.plan.turn_id(i)]) for i, p in enumerate(t.plan.turns[: t.index])
                               if kept.get(t.plan.turn_id(i)) is not None]
                    ids = backend.fit(lambda b, t=t, h=history: R.task_messages(t, self.characters, h, b),
                                      cfg.max_profile_chars, cfg.sampling.max_new_tokens)
                    if ids is not None:
                        out.append(backend.request(t.request_id, ids, cfg.sampling, self.cfg.seed, None))
                return out

            label = "all" if wave is None else f"wave-{wave:02d}"
            name = "responses" if wave is None else f"responses.turn{wave + 1}"
            outputs = self._generate(name, self.stages / "responses" / label, build)
            for t in tasks:
                out = outputs.get(t.request_id)
                if out is None:
                    reason, text, finish = "prompt_too_long", None, None
                elif out.get("error"):
                    reason, text, finish = "endpoint_error", None, None
                else:
                    text, finish = out["text"] or "", out["finish_reason"]
                    reason = check_response(text, t.plan.lang, finish, self.cfg.filters)
                self.counts.add(f"responses.{t.plan.turns[t.index].kind}", reason)
                kept[t.request_id] = text.strip() if reason is None and text is not None else None
                records.append({"id": t.request_id, "text": text, "finish_reason": finish, "dropped": reason}
                               | ({"error": out["error"]} if out is not None and out.get("error") else {}))
        if self.is_writer:
            atomic_write_jsonl(self.stages / "responses.jsonl", sorted(records, key=lambda r: r["id"]))
        return kept

    def session_stage(self, plans: Sequence[SessionPlan], answers: Mapping[str, str | None]) -> list[dict[str, Any]]:
        """Assembled sessions (at least ``sessions.min_turns`` kept turns), sorted by id."""
        provenance = {"supervision_model": self.cfg.supervision_model.describe(),
                      "seed_model": self.cfg.seed_model.describe(), "seed": self.cfg.seed}
        sessions = []
        for plan in plans:
            texts = [answers.get(plan.turn_id(i)) for i in range(len(plan.turns))]
            rec = assemble_session(plan, texts, self.characters[plan.character], provenance)
            n_turns = 0 if rec is None else len(rec["turns"]) // 2
            reason = None if n_turns >= self.cfg.sessions.min_turns else "too_short"
            self.counts.add("sessions", reason)
            if reason is None:
                sessions.append(rec)
        sessions.sort(key=lambda s: s["id"])
        if self.is_writer:
            atomic_write_jsonl(self.stages / "sessions.jsonl", sessions)
        return sessions

    def corpus_stage(self, sessions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Write ``corpus/`` (JSONL shards) and ``tfds/`` (array_record); both replaced atomically."""

        for s in sessions:
            parse_session(s, "<simulated>", 0)  # the corpus contract, checked before anything is written
        cfg = self.cfg.corpus
        corpus_dir = self.workdir / "corpus"
        with atomic_directory(corpus_dir, overwrite=True) as tmp:
            paths = write_shards(sessions, tmp, cfg.sessions_per_shard)
        out: dict[str, Any] = {"jsonl": [str(corpus_dir / p.name) for p in paths]}
        if cfg.tfds and sessions:
            with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout stays the report's
                out["tfds"] = build_corpus(corpus_dir, self.workdir / "tfds", cfg.validation_fraction, self.cfg.seed)
        return out
