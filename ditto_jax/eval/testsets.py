"""Evaluation test sets: WikiRoleEval sessions and MT-Bench questions, loaded with line-numbered errors.

**WikiRoleEval** (one session a line). Two layouts are accepted:

* ours (what ``build_testset`` writes and ``wikiroleeval_tiny.jsonl`` ships)::

    {"id", "system", "prompts": [str], "meta": {"label", "character", "lang", "role_consist_cands": [str],
     "rejection_labels": [0|1], "evidence": [[str]], "summary"}}

* the Ditto release (``wiki_roleplay_multilingual_test_input_w_evidence.jsonl``): no ``id``; the scoring fields
  ``role_consist_cands``, ``rejection_labels`` (also spelled ``"rejection labels"``) and ``evidence`` at top level
  or under ``meta``; evidence per prompt either a list of strings or one markdown list (``"- a\\n- b"``);
  ``meta`` also carries ``description``, ``aliases``, ``wiki``..., which are ignored except ``description``.

Both become ``EvalSession``. A malformed record is a ``RecordError`` naming file, line and field: with
``on_error="fail"`` (default) the first one raises ``RecordFileError``; with ``"skip"`` it is dropped and counted.

**MT-Bench** ``question.jsonl``: ``{"question_id": int, "category": str, "turns": [str, str]}``; only the
``roleplay`` category is kept (others are counted under ``other_category``).
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic

from ditto_jax.data.records import OnError, ReadReport, RecordError, RecordFileError, expand_paths, read_records

NonEmpty = Annotated[str, pydantic.StringConstraints(strict=True, min_length=1)]
Lang = Literal["en", "zh"]


class _Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class EvalTurn(_Frozen):
    """One user turn: the prompt, whether the role should refuse it (1) and the evidence for knowledge judging."""

    prompt: NonEmpty
    reject: Literal[0, 1]
    evidence: tuple[str, ...] = ()


class EvalSession(_Frozen):
    """One WikiRoleEval test session of a held-out role."""

    id: NonEmpty
    system: NonEmpty
    label: NonEmpty
    character: str | None = None
    lang: Lang
    candidates: tuple[NonEmpty, ...]
    summary: str = ""
    description: str | None = None
    turns: tuple[EvalTurn, ...]

    @property
    def answer_index(self) -> int:
        """Position of the true role among ``candidates``."""
        return self.candidates.index(self.label)


class MTBenchQuestion(_Frozen):
    """One MT-Bench question (two user turns)."""

    question_id: int
    category: NonEmpty
    turns: tuple[NonEmpty, NonEmpty]


# ------------------------------------------------------------------------------------------------------------
# WikiRoleEval
# ------------------------------------------------------------------------------------------------------------
class _RawMeta(pydantic.BaseModel):
    """The ``meta`` object: fields we use are typed strictly; others (wiki, claims, ...) are allowed and ignored."""

    model_config = pydantic.ConfigDict(extra="allow")

    label: NonEmpty
    lang: Lang
    character: NonEmpty | None = None
    summary: str = ""
    description: str | None = None


class _RawSession(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    id: NonEmpty | None = None
    system: NonEmpty
    prompts: list[NonEmpty] = pydantic.Field(min_length=1)
    meta: _RawMeta


_Cands = pydantic.TypeAdapter(list[NonEmpty])
_Labels = pydantic.TypeAdapter(list[Literal[0, 1]])
_Evidence = pydantic.TypeAdapter(list[list[str] | str])
_LANG_ALIASES = {"english": "en", "chinese": "zh", "zh-cn": "zh", "zh_cn": "zh", "zh-hans": "zh"}


def _markdown_list(text: str) -> list[str]:
    """``"- a\\n- b"`` (or plain lines) -> ``["a", "b"]``."""
    items = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip() for line in text.splitlines()]
    return [item for item in items if item]


def _pick(obj: dict[str, Any], meta: dict[str, Any], *names: str) -> tuple[Any, str] | None:
    """The first of ``names`` found under ``meta`` then at top level, with its dotted field path."""
    for name in names:
        if name in meta:
            return meta[name], f"meta.{name}"
    for name in names:
        if name in obj:
            return obj[name], name
    return None


def _field_error(path: str, line: int, field: str, message: str, reason: str = "bad_value") -> RecordFileError:
    return RecordFileError([RecordError(path, line, message, reason, field)])


def _validated(adapter: pydantic.TypeAdapter, value: Any, field: str, path: str, line: int) -> Any:
    try:
        return adapter.validate_python(value, strict=True)
    except pydantic.ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = ".".join([field, *(str(p) for p in err["loc"])])
            reason = "wrong_type" if err["type"].endswith("_type") else "bad_value"
            errors.append(RecordError(path, line, err["msg"], reason, loc))
        raise RecordFileError(errors) from None


def parse_wikiroleeval(obj: Any, path: str = "<memory>", line: int = 0) -> EvalSession:
    """Validate one WikiRoleEval record (either layout) as an ``EvalSession``.

    Raises ``pydantic.ValidationError`` or ``RecordFileError`` naming the field (``meta.rejection_labels``, ...).
    """
    if not isinstance(obj, dict):
        raise _field_error(path, line, "<root>", f"expected a JSON object, got {type(obj).__name__}", "wrong_type")
    meta = obj.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("lang"), str):
        lang = meta["lang"].strip().lower()
        meta = {**meta, "lang": _LANG_ALIASES.get(lang, lang)}
        obj = {**obj, "meta": meta}
    raw = _RawSession.model_validate(obj)
    meta_d = obj["meta"]
    n = len(raw.prompts)

    found = _pick(obj, meta_d, "role_consist_cands")
    if found is None:
        raise _field_error(path, line, "meta.role_consist_cands", "Field required", "missing_field")
    cands = _validated(_Cands, found[0], found[1], path, line)
    if len(cands) < 2:
        raise _field_error(path, line, found[1], f"needs at least 2 candidates, got {len(cands)}")
    if len(set(cands)) != len(cands):
        raise _field_error(path, line, found[1], f"duplicate candidates: {cands}")
    if raw.meta.label not in cands:
        raise _field_error(path, line, found[1], f"the true role {raw.meta.label!r} is not among the candidates {cands}")

    found = _pick(obj, meta_d, "rejection_labels", "rejection labels")
    if found is None:
        raise _field_error(path, line, "meta.rejection_labels", "Field required", "missing_field")
    labels = _validated(_Labels, found[0], found[1], path, line)
    if len(labels) != n:
        raise _field_error(path, line, found[1], f"has {len(labels)} labels for {n} prompts")

    found = _pick(obj, meta_d, "evidence")
    evidence: list[list[str]] = [[] for _ in range(n)]
    if found is not None:
        raw_ev = _validated(_Evidence, found[0], found[1], path, line)
        if len(raw_ev) != n:
            raise _field_error(path, line, found[1], f"has {len(raw_ev)} entries for {n} prompts")
        evidence = [_markdown_list(e) if isinstance(e, str) else [s.strip() for s in e if s.strip()] for e in raw_ev]

    sid = raw.id or f"line{line:05d}-{raw.meta.label}"
    return EvalSession(
        id=sid, system=raw.system, label=raw.meta.label, character=raw.meta.character, lang=raw.meta.lang,
        candidates=tuple(cands), summary=raw.meta.summary or "", description=raw.meta.description,
        turns=tuple(EvalTurn(prompt=p, reject=r, evidence=tuple(e)) for p, r, e in zip(raw.prompts, labels, evidence)),
    )


def session_to_json(session: EvalSession) -> dict[str, Any]:
    """Our WikiRoleEval line for a session (inverse of ``parse_wikiroleeval``)."""
    meta: dict[str, Any] = {"label": session.label, "character": session.character, "lang": session.lang,
                            "role_consist_cands": list(session.candidates),
                            "rejection_labels": [t.reject for t in session.turns],
                            "evidence": [list(t.evidence) for t in session.turns], "summary": session.summary}
    if session.character is None:
        del meta["character"]
    if session.description is not None:
        meta["description"] = session.description
    return {"id": session.id, "system": session.system, "prompts": [t.prompt for t in session.turns], "meta": meta}


OFFICIAL_WIKIROLEEVAL = "wiki_roleplay_multilingual_test_input_w_evidence.jsonl"
"""The paper's WikiRoleEval file (OFA-Sys/Ditto ``data/``)."""


def _asset(name: str) -> Path:
    return Path(str(importlib.resources.files("ditto_jax"))) / "data" / "assets" / name


def default_wikiroleeval_path() -> Path:
    """The shipped tiny WikiRoleEval set (the embedded knowledge base's held-out characters)."""
    return _asset("wikiroleeval_tiny.jsonl")


def default_mtbench_path() -> Path:
    """The shipped roleplay questions: project-written, in MT-Bench's ``question.jsonl`` layout (ids 91-100) but
    not MT-Bench's questions — reports call them "Roleplay (project set)". For MT-Bench itself pass FastChat's
    ``fastchat/llm_judge/data/mt_bench/question.jsonl`` as ``testset.mtbench``."""
    return _asset("mtbench_roleplay_tiny.jsonl")


def load_wikiroleeval(path: str | Path | None = None, on_error: OnError = "fail") -> tuple[list[EvalSession], ReadReport]:
    """Sessions from a file/folder/glob (``None`` = the shipped tiny set) and the read report.

    Duplicate ids are dropped after the first (counted in the report)."""
    try:
        files = [default_wikiroleeval_path()] if path is None else expand_paths(path)
    except FileNotFoundError:
        files = []
    if not files:
        hint = ""
        if Path(str(path)).name == OFFICIAL_WIKIROLEEVAL:
            hint = (f" — this is the paper's test set: download {OFFICIAL_WIKIROLEEVAL} from the OFA-Sys/Ditto "
                    f"repository (data/{OFFICIAL_WIKIROLEEVAL}, stored with git-lfs: `git lfs pull`) to that path, "
                    f"or build one with `ditto-jax eval build-testset`")
        raise FileNotFoundError(f"no WikiRoleEval files at {path} (testset.wikiroleeval){hint}")
    return read_records(files, parse_wikiroleeval, on_error, key=lambda s: s.id)


def parse_mtbench(obj: Any, path: str = "<memory>", line: int = 0) -> MTBenchQuestion:
    """Validate one MT-Bench ``question.jsonl`` record (extra fields such as ``reference`` are ignored)."""
    if not isinstance(obj, dict):
        raise _field_error(path, line, "<root>", f"expected a JSON object, got {type(obj).__name__}", "wrong_type")
    for name in ("question_id", "category", "turns"):
        if name not in obj:
            raise _field_error(path, line, name, "Field required", "missing_field")
    turns = obj["turns"]
    if not isinstance(turns, list) or len(turns) != 2:
        got = f"{len(turns)} turns" if isinstance(turns, list) else type(turns).__name__
        raise _field_error(path, line, "turns", f"expected a list of 2 turns, got {got}")
    return MTBenchQuestion.model_validate(
        {"question_id": obj["question_id"], "category": obj["category"], "turns": tuple(turns)}, strict=True)


def load_mtbench(path: str | Path | None = None, category: str = "roleplay",
                 on_error: OnError = "fail") -> tuple[list[MTBenchQuestion], ReadReport]:
    """Questions of ``category`` (``None`` path = the shipped roleplay set); other categories are counted in the
    report under ``skipped["other_category"]`` (they are valid, just not part of this evaluation)."""
    try:
        files = [default_mtbench_path()] if path is None else expand_paths(path)
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"no MT-Bench question files at {path} (testset.mtbench; FastChat's "
                                f"fastchat/llm_judge/data/mt_bench/question.jsonl in lm-sys/FastChat)")
    questions, report = read_records(files, parse_mtbench, on_error, key=lambda q: q.question_id)
    kept = [q for q in questions if q.category == category]
    if len(kept) != len(questions):
        report.skipped["other_category"] += len(questions) - len(kept)
        report.kept = len(kept)
    return kept, report
