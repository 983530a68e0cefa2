"""``ditto-jax characters {validate,stats}``: check a knowledge-base file; count its roles."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``characters validate FILE`` and ``characters stats [FILE] [--json]``."""
    parser = subparsers.add_parser("characters", help="validate and describe character knowledge bases")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("validate", help="exit 0 when every line is a valid character; else list every problem")
    p.add_argument("files", nargs="+", help="JSONL file(s), folder(s) or glob(s)")
    p.add_argument("--layout", choices=["auto", "ditto_jax", "ditto"], default="auto",
                   help="record layout (auto: Ditto-release records are recognised and normalised)")
    p.set_defaults(func=_validate)
    p = sub.add_parser("stats", help="counts by language, category and split")
    p.add_argument("files", nargs="*", help="JSONL file(s)/folder/glob; none = the embedded default")
    p.add_argument("--layout", choices=["auto", "ditto_jax", "ditto"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_stats)


def _validate(args: argparse.Namespace) -> int:
    from ditto_jax.data.characters import validate_characters

    try:
        errors, report = validate_characters(args.files, layout=args.layout)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for err in errors:
        print(err)
    status = "valid" if not errors else f"{len(errors)} problem(s)"
    print(f"{report.read} record(s), {report.kept} valid, {sum(report.skipped.values())} invalid, "
          f"{report.duplicates} duplicate(s): {status}", file=sys.stderr)
    return 0 if not errors else 1


def _stats(args: argparse.Namespace) -> int:
    from ditto_jax.data.characters import character_stats, read_characters
    from ditto_jax.data.records import RecordFileError

    try:
        chars, report = read_characters(args.files or None, on_error="skip", layout=args.layout)
    except (FileNotFoundError, RecordFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = character_stats(chars) | {"read": report.to_dict()}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
