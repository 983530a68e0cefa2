"""The role-play corpus: session records, JSONL shards, a TFDS (array_record) build with train/validation.

A session line::

    {"id", "character", "lang", "system", "turns": [{"role": "user", "content", "kind", "reject",
     "evidence"}, {"role": "assistant", "content"}, ...], ...provenance fields}

``system`` is the brief intro (the paper drops the profile). Turns alternate user/assistant, starting with a
user turn and ending with an assistant turn. User turns may carry ``kind`` (``role_specific`` |
``contrastive``), ``reject`` (the turn asks beyond the role's knowledge) and ``evidence`` (facts the answer
should use). Fields beyond these (``source``, ``partner``, ``round``, ...) are kept as provenance.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Sequence

import pydantic
from array_record.python.array_record_module import ArrayRecordWriter

from ditto_jax.data import tfds_builder
from ditto_jax.data.records import (
    OnError,
    ReadReport,
    RecordError,
    RecordFileError,
    expand_paths,
    find_dataset_dir,
    pydantic_errors,
    read_records,
)
from ditto_jax.fileio import atomic_directory, atomic_write_json, atomic_write_jsonl
from ditto_jax.tokenizer import default_tokenizer

NonEmpty = Annotated[str, pydantic.StringConstraints(strict=True, min_length=1)]
QueryKind = Literal["role_specific", "contrastive"]
SPLITS = ("train", "validation")


class Turn(pydantic.BaseModel):
    """One message; user turns carry the query metadata."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True, frozen=True)

    role: Literal["user", "assistant"]
    content: NonEmpty
    kind: QueryKind | None = None
    reject: bool | None = None
    evidence: list[str] | None = None


class Session(pydantic.BaseModel):
    """One SFT session of one character."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True, frozen=True)

    id: NonEmpty
    character: NonEmpty
    lang: Literal["en", "zh"]
    system: NonEmpty
    turns: Annotated[list[Turn], pydantic.Field(min_length=2)]

    @pydantic.model_validator(mode="after")
    def _alternating(self) -> "Session":
        for i, turn in enumerate(self.turns):
            want = "user" if i % 2 == 0 else "assistant"
            if turn.role != want:
                raise ValueError(f"turns.{i}: expected role {want!r} (user/assistant alternate), got {turn.role!r}")
        if self.turns[-1].role != "assistant":
            raise ValueError("the last turn must be an assistant turn")
        return self

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: the system intro, then the turns (role and content only)."""
        return [{"role": "system", "content": self.system}] + [{"role": t.role, "content": t.content} for t in self.turns]

    def to_json(self) -> dict[str, Any]:
        """The JSON line (provenance fields included, unset metadata omitted)."""
        return self.model_dump(mode="json", exclude_none=True)


def parse_session(obj: Any, path: str = "<memory>", line: int = 0) -> Session:
    """Validate one JSON object as a ``Session`` (an unknown role is reported as reason ``unknown_role``)."""
    if not isinstance(obj, dict):
        raise RecordFileError([RecordError(path, line, f"expected a JSON object, got {type(obj).__name__}", "wrong_type")])
    try:
        return Session.model_validate(obj)
    except pydantic.ValidationError as exc:
        errors = pydantic_errors(path, line, exc)
        errors = [RecordError(e.path, e.line, e.message, "unknown_role", e.field)
                  if e.field and e.field.endswith(".role") and e.reason == "bad_value" else e for e in errors]
        raise RecordFileError(errors) from None


def read_sessions(spec: str | Path | Iterable[str | Path], on_error: OnError = "fail",
                  report: ReadReport | None = None) -> tuple[list[Session], ReadReport]:
    """Sessions from JSONL file(s)/folder/glob; duplicate ids dropped after the first (counted)."""
    return read_records(expand_paths(spec), parse_session, on_error, key=lambda s: s.id, report=report)


def write_shards(sessions: Sequence[Session | dict], out_dir: str | Path, shard_size: int = 1000,
                 prefix: str = "sessions") -> list[Path]:
    """Write ``prefix-00000-of-0000N.jsonl`` shards atomically; returns their paths."""
    out_dir = Path(out_dir)
    records = [s.to_json() if isinstance(s, Session) else s for s in sessions]
    n = max(1, -(-len(records) // shard_size))
    paths = []
    for k in range(n):
        path = out_dir / f"{prefix}-{k:05d}-of-{n:05d}.jsonl"
        atomic_write_jsonl(path, records[k * shard_size:(k + 1) * shard_size])
        paths.append(path)
    return paths


def assign_split(session_id: str, validation_fraction: float, seed: int = 0) -> str:
    """``"validation"`` for a stable, seeded ``validation_fraction`` of ids, else ``"train"``."""
    digest = hashlib.sha256(f"{seed}:{session_id}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def build_corpus(inputs: str | Path | Iterable[str | Path], out_dir: str | Path, validation_fraction: float = 0.05,
                 seed: int = 0, on_error: OnError = "skip", overwrite: bool = True) -> dict[str, Any]:
    """Validate the JSONL inputs and write a TFDS ``array_record`` dataset with train/validation splits to
    ``out_dir`` (atomically), plus ``out_dir/summary.json``; returns the summary."""

    sessions, report = read_sessions(inputs, on_error)
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for s in sessions:
        by_split[assign_split(s.id, validation_fraction, seed)].append(s.to_json())
    if not by_split["train"]:
        raise ValueError(f"no valid sessions for the train split in {inputs} ({report.to_dict()})")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        dataset_dir = tfds_builder.build(tfds_builder.RolePlayCorpus, by_split, tmp)
        summary = {
            "dataset": str(Path(out_dir) / dataset_dir.relative_to(tmp)),
            "splits": {k: len(v) for k, v in by_split.items()},
            "validation_fraction": validation_fraction,
            "seed": seed,
            "read": report.to_dict(),
            "errors": [str(e) for e in report.errors[:100]],
        }
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def load_corpus(path: str | Path | Iterable[str | Path], split: str | None = "train",
                on_error: OnError = "fail") -> list[Session]:
    """Sessions of a built TFDS corpus split (``split=None``: all splits), or of JSONL file(s) (all)."""
    if isinstance(path, (str, Path)) and Path(path).is_dir() and (ds := find_dataset_dir(path)):
        splits = tfds_builder.split_names(ds) if split is None else [split]
        out = []
        for name in splits:
            for i, rec in enumerate(tfds_builder.read_split(ds, name)):
                out.append(parse_session(rec, f"{ds}[{name}]", i))
        return out
    return read_sessions(path, on_error)[0]


def corpus_stats(sessions: Iterable[Session], tokenizer: Any | None = None) -> dict[str, Any]:
    """Sessions, turns (user/assistant exchanges), tokens (and trained tokens) overall and by language;
    user turns by query kind and by rejection label."""
    if tokenizer is None:
        tokenizer = default_tokenizer()
    total = collections.Counter()
    by_lang: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kinds: collections.Counter = collections.Counter()
    rejects: collections.Counter = collections.Counter()
    characters: set[str] = set()
    for s in sessions:
        ids, mask = tokenizer.encode_chat(s.messages())
        exchanges = len(s.turns) // 2
        row = {"sessions": 1, "turns": exchanges, "tokens": len(ids), "trained_tokens": sum(mask)}
        total.update(row)
        by_lang[s.lang].update(row)
        characters.add(s.character)
        for t in s.turns:
            if t.role == "user":
                kinds[t.kind or "unlabelled"] += 1
                rejects["unlabelled" if t.reject is None else str(t.reject).lower()] += 1
    n = max(total["sessions"], 1)
    return {
        **{k: total[k] for k in ("sessions", "turns", "tokens", "trained_tokens")},
        "characters": len(characters),
        "mean_turns": round(total["turns"] / n, 2),
        "mean_tokens": round(total["tokens"] / n, 1),
        "by_lang": {lang: dict(c) for lang, c in sorted(by_lang.items())},
        "by_kind": dict(sorted(kinds.items())),
        "by_reject": dict(sorted(rejects.items())),
        "tokenizer_vocab": tokenizer.vocab_size,
    }


def write_array_record(sessions: Sequence[Session | dict], path: str | Path) -> Path:
    """Write sessions as one JSON record each into an ``array_record`` file (atomically); the pipeline reads
    it with ``format: array_record``."""


    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for s in sessions:
            rec = s.to_json() if isinstance(s, Session) else s
            writer.write(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
