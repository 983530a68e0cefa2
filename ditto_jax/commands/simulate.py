"""``ditto-jax simulate --config FILE --workdir DIR [dotted.key=value ...]``: Ditto self-simulation; re-running resumes."""

from __future__ import annotations

import argparse
import json
import sys

from ditto_jax.commands import add_process_arguments, output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``simulate``."""
    p = subparsers.add_parser(
        "simulate", help="Ditto self-simulation: queries -> responses -> sessions -> corpus",
        description="The supervision model writes a role-play corpus from character profiles (Ditto §3.3): query "
                    "simulation, response simulation, session assembly, filtering. Writes WORKDIR/corpus/*.jsonl, "
                    "WORKDIR/tfds and WORKDIR/simulation_report.json. Re-running with the same --workdir resumes; "
                    "the final corpus is the same as an uninterrupted run's.")
    p.add_argument("--config", required=True, help="simulate config YAML (a path or a preset such as simulate/tiny)")
    p.add_argument("--workdir", type=output_dir, required=True, help="run folder (stage outputs, corpus, report)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. partners.strategy=far characters.limit_per_lang=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of a summary")
    add_process_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config (before JAX starts), start the distributed runtime, simulate, print the report."""
    from ditto_jax.config import ConfigError, load_config
    from ditto_jax.simulation.config import SimulateConfig

    try:
        cfg = load_config(SimulateConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ditto_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from ditto_jax.simulation.report import format_report
    from ditto_jax.simulation.stages import Simulation

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    try:
        report = Simulation(cfg, args.workdir, log=log, progress=not args.no_progress).run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() != 0:
        print(f"process {jax.process_index()}: done (process 0 writes the corpus and the report)")
    elif args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_report(report))
    if jax.process_index() == 0 and report["corpus"]["sessions"] == 0:
        print(f"error: the corpus is empty: every session was filtered out (counts by reason in "
              f"{args.workdir}/simulation_report.json)", file=sys.stderr)
        return 1
    return 0
