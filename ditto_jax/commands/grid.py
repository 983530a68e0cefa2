"""``ditto-jax grid``: the paper's cross-supervision grid (seed x supervision model, plus no role-play data).

    ditto-jax grid --config configs/grid/tiny.yaml --workdir DIR [dotted.key=value ...]   # re-running resumes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditto_jax.commands import output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``grid``."""
    parser = subparsers.add_parser("grid", help="cross-supervision grid: simulate, fine-tune and evaluate every cell",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="dotted.key=value config overrides")
    parser.add_argument("--config", required=True, help="YAML config (a path, or a preset such as grid/tiny)")
    parser.add_argument("--workdir", required=True, type=output_dir, help="work dir (re-running resumes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, run the grid, print the tables."""
    from ditto_jax.config import ConfigError
    from ditto_jax.grid.config import load_grid_config
    from ditto_jax.grid.pipeline import run_grid

    try:
        cfg = load_grid_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr))
    result = run_grid(cfg, args.workdir, log=log, progress=not args.no_progress)
    print((Path(args.workdir) / "grid.md").read_text(encoding="utf-8"), file=sys.stderr)
    print(json.dumps({"values": result["values"], "unreliable_metrics": result["unreliable_metrics"]}))
    print(f"wrote {args.workdir}/grid.json, grid.md, grid.png", file=sys.stderr)
    return 0
