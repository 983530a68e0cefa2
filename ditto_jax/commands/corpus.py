"""``ditto-jax corpus {build,stats,validate}``: JSONL sessions -> TFDS array_record corpus; corpus counts."""

from __future__ import annotations

import argparse
import json
import sys

from ditto_jax.commands import output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``corpus build``, ``corpus stats`` and ``corpus validate``."""
    parser = subparsers.add_parser("corpus", help="build and describe role-play corpora")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("build", help="validate JSONL sessions and write a TFDS array_record corpus")
    p.add_argument("--input", required=True, action="append", help="JSONL file, folder or glob (repeatable)")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (replaced atomically)")
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="seeds the train/validation assignment")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="skip (count) bad lines, or stop at the first one")
    p.set_defaults(func=_build)

    p = sub.add_parser("stats", help="sessions, turns, tokens by language and query kind")
    p.add_argument("path", help="a built corpus folder, or JSONL file/folder/glob")
    p.add_argument("--split", default=None, help="one split of a built corpus (default: all)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the embedded one)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="JSONL input: bad lines")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_stats)

    p = sub.add_parser("validate", help="exit 0 when every line is a valid session; else list every problem")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_validate)


def _build(args: argparse.Namespace) -> int:
    from ditto_jax.data.corpus import build_corpus
    from ditto_jax.data.records import RecordFileError

    try:
        summary = build_corpus(args.input, args.out, args.validation_fraction, args.seed, args.on_error)
    except (FileNotFoundError, RecordFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for err in summary["errors"]:
        print(err, file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, ensure_ascii=False))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ditto_jax.data.corpus import corpus_stats, load_corpus, read_sessions
    from ditto_jax.data.records import RecordFileError, find_dataset_dir
    from ditto_jax.tokenizer import load_tokenizer

    read = None
    try:
        if Path(args.path).is_dir() and find_dataset_dir(args.path):
            sessions = load_corpus(args.path, split=args.split)
        else:
            sessions, report = read_sessions(args.path, on_error=args.on_error)
            read = report.to_dict()
    except (FileNotFoundError, RecordFileError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    stats = corpus_stats(sessions, tokenizer)
    if read is not None:
        stats["read"] = read
    if args.json:
        print(json.dumps(stats, ensure_ascii=False))
    else:
        for key, value in stats.items():
            print(f"{key}: {value}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ditto_jax.data.corpus import read_sessions

    try:
        _, report = read_sessions(args.files, on_error="skip")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for err in report.errors:
        print(err)
    print(f"{report.read} session(s), {report.kept} valid, {json.dumps(report.to_dict())}", file=sys.stderr)
    return 0 if not report.errors else 1
