"""``ditto-jax train --config FILE --workdir DIR [dotted.key=value ...]``: SFT; re-running resumes.

Exit statuses: ``EXIT_STATUS`` (also shown by ``ditto-jax train --help``).
"""

from __future__ import annotations

import argparse
import sys

from ditto_jax.commands import add_process_arguments, output_dir

EXIT_STATUS = ("exit status: 0 trained to train.steps (or already complete: nothing to do); 1 training failed "
               "(the message says why); 2 invalid config; 143 stopped by SIGTERM (preemption) after saving a "
               "checkpoint of the step in flight: re-run the same command to resume")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    p = subparsers.add_parser("train", help="supervised fine-tuning on a role-play corpus",
                              description="Supervised fine-tuning. Re-running with the same --workdir resumes from "
                                          "the newest complete checkpoint.", epilog=EXIT_STATUS)
    p.add_argument("--config", required=True, help="SFT config YAML (a path or a preset such as sft/tiny)")
    p.add_argument("--workdir", type=output_dir, required=True,
                   help="run folder: checkpoints, metrics.jsonl, tensorboard, export")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.peak_lr=1e-5")
    add_process_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config (before JAX starts), start the distributed runtime, train."""
    from ditto_jax.config import ConfigError
    from ditto_jax.train.config import load_sft_config

    try:
        cfg = load_sft_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ditto_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, platform=cfg.platform)
    from ditto_jax.train.loop import TrainingError, run_training

    try:
        result = run_training(cfg, args.workdir)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{result.status}: step {result.step}, loss {result.metrics.get('loss', float('nan')):.4f}, "
          f"checkpoint {result.last_checkpoint}")
    if result.status == "preempted":
        from ditto_jax.train.preemption import PREEMPTED_EXIT_CODE

        return PREEMPTED_EXIT_CODE
    return 0
