"""``ditto-jax eval``: judged WikiRoleEval + MT-Bench roleplay evaluation, and side-by-side reports.

    ditto-jax eval --config configs/eval/tiny.yaml --workdir DIR [dotted.key=value ...]   # re-running resumes
    ditto-jax eval report --runs DIR1 DIR2 [...] --out DIR                              # runs side by side
    ditto-jax eval build-testset --config configs/eval/testset-tiny.yaml --workdir DIR [overrides]
"""

from __future__ import annotations

import argparse
import json
import sys

from ditto_jax.commands import output_dir

ACTIONS = ("report", "build-testset")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``eval`` (run; ``report``; ``build-testset``)."""
    parser = subparsers.add_parser(
        "eval", help="WikiRoleEval-style judged evaluation and MT-Bench roleplay",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="[ACTION] OVERRIDE",
                        help=f"optional action ({', '.join(ACTIONS)}), then dotted.key=value config overrides")
    parser.add_argument("--config", help="YAML config (a path, or a preset such as eval/tiny)")
    parser.add_argument("--workdir", type=output_dir, help="work dir (re-running with the same one resumes)")
    parser.add_argument("--runs", nargs="+", metavar="DIR", help="report: evaluation work dirs to compare")
    parser.add_argument("--out", type=output_dir, help="report: output folder for report.md and report.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch on the optional action."""
    from ditto_jax.config import ConfigError
    from ditto_jax.data.records import RecordFileError

    items = list(args.items)
    action = items.pop(0) if items and items[0] in ACTIONS else "run"
    try:
        if action == "report":
            return _report(args, items)
        if not args.config or not args.workdir:
            print("error: --config and --workdir are required", file=sys.stderr)
            return 2
        if action == "build-testset":
            return _build(args, items)
        return _evaluate(args, items)
    except (ConfigError, RecordFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    from ditto_jax.config import load_config
    from ditto_jax.eval.config import EvalConfig
    from ditto_jax.eval.pipeline import run_eval

    cfg = load_config(EvalConfig, args.config, overrides)
    from ditto_jax.eval.report import calibration_warnings, load_runs, results_table

    report = run_eval(cfg, args.workdir, progress=not args.no_progress)
    runs = load_runs([args.workdir])
    print(results_table(runs), file=sys.stderr)
    for warning in calibration_warnings(runs):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(json.dumps({"metrics": report["metrics"], "mtbench": report["mtbench"],
                      "unparsable": {m: u["samples"] for m, u in report["unparsable"].items()},
                      "unreliable_metrics": report.get("unreliable_metrics", [])}, ensure_ascii=False))
    print(f"wrote {args.workdir}/report.json, report.md, report.png, judgements.jsonl", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, extra: list[str]) -> int:
    from ditto_jax.eval.pipeline import compare_runs

    if extra:
        print(f"error: unexpected arguments {extra}", file=sys.stderr)
        return 2
    if not args.runs or not args.out:
        print("error: report needs --runs DIR [DIR ...] and --out DIR", file=sys.stderr)
        return 2
    paths = compare_runs(args.runs, args.out)
    print(f"wrote {paths['md']} and {paths['png']}", file=sys.stderr)
    return 0


def _build(args: argparse.Namespace, overrides: list[str]) -> int:
    from ditto_jax.config import load_config
    from ditto_jax.eval.builder import BuildTestSetConfig, build_testset

    cfg = load_config(BuildTestSetConfig, args.config, overrides)
    summary = build_testset(cfg, args.workdir)
    print(json.dumps(summary, ensure_ascii=False))
    return 0
