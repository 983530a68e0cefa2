"""Reading JSONL record files with line-numbered errors and a skip-or-fail policy.

Every problem is a ``RecordError`` (file, line, field, message, reason). With ``on_error="fail"`` the first
problem raises ``RecordFileError``; with ``"skip"`` the record is dropped and counted under its reason
(``malformed_json``, ``invalid_utf8``, ``missing_field``, ``wrong_type``, ``empty_field``, ...).
"""

from __future__ import annotations

import collections
import glob as globlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

import pydantic

OnError = Literal["fail", "skip"]
T = TypeVar("T")


@dataclass(frozen=True)
class RecordError:
    """One problem with one line of one file."""

    path: str
    line: int
    message: str
    reason: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class RecordFileError(ValueError):
    """Raised on the first bad record under ``on_error="fail"``; ``errors`` lists what was found."""

    def __init__(self, errors: list[RecordError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


@dataclass
class ReadReport:
    """Counts of what a read kept and dropped (``skipped`` by reason); nothing is dropped uncounted."""

    read: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    duplicates: int = 0
    errors: list[RecordError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped), "duplicates": self.duplicates}


def expand_paths(spec: str | Path | Iterable[str | Path], suffix: str = ".jsonl") -> list[Path]:
    """A file, a folder (its ``*{suffix}`` files), a glob, or a list of those -> sorted existing files."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for item in specs:
        p = Path(item)
        if p.is_dir():
            out += sorted(p.glob(f"*{suffix}"))
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in globlib.glob(str(item), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or glob match")
            out += [m for m in matches if m.is_file()]
    return out


def decode_json(raw: bytes, origin: str, line: int) -> Any | RecordError:
    """One JSON value from raw bytes, or the ``RecordError`` saying why not (invalid UTF-8, malformed JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RecordError(origin, line, f"invalid UTF-8 at byte {exc.start}", "invalid_utf8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return RecordError(origin, line, f"malformed JSON: {exc.msg} (column {exc.colno})", "malformed_json")


def iter_json_lines(path: Path) -> Iterator[tuple[str, int, Any | RecordError]]:
    """``(path, line_number, object or RecordError)`` per non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield str(path), number, decode_json(raw, str(path), number)


_REASONS = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "string_too_short": "empty_field",
    "too_short": "empty_field",
    "literal_error": "bad_value",
    "value_error": "bad_value",
}


def pydantic_errors(path: str, line: int, exc: pydantic.ValidationError) -> list[RecordError]:
    """One ``RecordError`` per pydantic error, naming the dotted field."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or None
        reason = _REASONS.get(err["type"], "wrong_type" if err["type"].endswith("_type") else "bad_value")
        out.append(RecordError(path, line, err["msg"], reason, loc))
    return out


def read_records(
    paths: Iterable[Path],
    parse: Callable[[Any, str, int], T],
    on_error: OnError = "fail",
    key: Callable[[T], Any] | None = None,
    report: ReadReport | None = None,
) -> tuple[list[T], ReadReport]:
    """Parse every line of JSONL files; see ``read_items``."""
    items = (item for path in paths for item in iter_json_lines(path))
    return read_items(items, parse, on_error, key, report)


def read_items(
    items: Iterable[tuple[str, int, Any]],
    parse: Callable[[Any, str, int], T],
    on_error: OnError = "fail",
    key: Callable[[T], Any] | None = None,
    report: ReadReport | None = None,
) -> tuple[list[T], ReadReport]:
    """Parse ``(origin, line, object or RecordError)`` items with ``parse(obj, origin, line)`` (raising
    ``pydantic.ValidationError`` or ``RecordFileError``); drop duplicates by ``key`` (first kept, counted).
    Returns the records and the report."""
    report = report or ReadReport()
    out: list[T] = []
    seen: set[Any] = set()
    for path, number, obj in items:
        report.read += 1
        errors: list[RecordError] = []
        if isinstance(obj, RecordError):
            errors = [obj]
        else:
            try:
                rec = parse(obj, str(path), number)
            except pydantic.ValidationError as exc:
                errors = pydantic_errors(str(path), number, exc)
            except RecordFileError as exc:
                errors = exc.errors
        if errors:
            report.errors += errors
            if on_error == "fail":
                raise RecordFileError(errors)
            report.skipped[errors[0].reason] += 1
            continue
        if key is not None:
            k = key(rec)
            if k in seen:
                report.duplicates += 1
                report.errors.append(RecordError(str(path), number, f"duplicate of an earlier record ({k})",
                                                 "duplicate"))
                continue
            seen.add(k)
        out.append(rec)
        report.kept += 1
    return out, report


def find_dataset_dir(path: str | Path) -> Path | None:
    """The TFDS version folder at or under ``path`` (the folder holding ``dataset_info.json``), or None."""
    path = Path(path)
    if (path / "dataset_info.json").exists():
        return path
    found = sorted(p.parent for p in path.glob("*/*/dataset_info.json"))
    return found[-1] if found else None
