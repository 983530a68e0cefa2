"""``ditto-jax demo [--workdir DIR] [--model tiny|SRC] [--config FILE] [dotted.key=value ...]``: the whole pipeline on
SmolLM2-135M-Instruct by default (``--model tiny``: the random-init pipeline check); re-running resumes."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ditto_jax.commands import output_dir

DEFAULT_WORKDIR = "runs/demo"
DEFAULT_CONFIG = "demo"
TINY = "tiny"
TINY_CONFIG = "demo-tiny"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo", help="the whole Ditto pipeline end to end on SmolLM2-135M-Instruct (or --model tiny)",
        description="Query simulation -> response simulation -> sessions -> corpus (JSONL + TFDS) -> SFT -> export "
                    "to Hugging Face format (checked against transformers) -> evaluation of the seed and the "
                    "fine-tuned model by the same judge, on the bundled knowledge base. By default the model is "
                    "the real SmolLM2-135M-Instruct (fetched once into the cache); --model tiny runs a tiny "
                    "random-init model instead (its generations are meaningless: a pipeline check). Re-running "
                    "with the same --workdir resumes. Writes WORKDIR/demo_summary.json and "
                    "WORKDIR/eval/transcripts.md.")
    p.add_argument("--workdir", type=output_dir,
                   default=DEFAULT_WORKDIR, help=f"run folder (default {DEFAULT_WORKDIR})")
    p.add_argument("--model", default=None,
                   help=f"'{TINY}' = the random-init pipeline check (the preset configs/{TINY_CONFIG}.yaml); a named "
                        "model (see `ditto-jax models list`), .gguf file, Hugging Face folder or checkpoint replaces "
                        "the demo's model (default: the config's, smollm2-135m-instruct)")
    p.add_argument("--config", default=None,
                   help=f"demo config YAML (default: the preset configs/{DEFAULT_CONFIG}.yaml, or "
                        f"configs/{TINY_CONFIG}.yaml with --model {TINY})")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. sft.train.steps=20 simulate.characters.limit_per_lang=2 model.seed=1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (logs go to stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the whole config (before JAX starts), run or resume the demo, print the summary."""
    from ditto_jax.config import ConfigError
    from ditto_jax.demo.config import load_demo_config

    tiny = args.model == TINY
    config = args.config or (TINY_CONFIG if tiny else DEFAULT_CONFIG)
    model = None if tiny or args.model is None else {"path": args.model}
    try:
        cfg = load_demo_config(config, args.overrides, args.workdir, model=model)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ditto_jax.data.records import RecordFileError
    from ditto_jax.demo import DemoError, format_summary, run_demo
    from ditto_jax.train.loop import TrainingError

    stdout = sys.stdout
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        # With --json, stdout carries only the summary: the stages' own prints go to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            summary = run_demo(cfg, args.workdir, log=log, progress=not args.no_progress)
    except (ConfigError, DemoError, TrainingError, RecordFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    print(json.dumps(summary, ensure_ascii=False) if args.json else format_summary(summary), file=stdout)
    return 0
