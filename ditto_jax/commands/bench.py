"""``ditto-jax bench {model,kernels,sample,train,data,simulate,cpu-kernels} ... --json``.

Each benchmark lives in ``ditto_jax/bench/<name>.py`` (``-`` in a name is ``_`` in the module's) with ``add_arguments(parser)`` and ``run(args) -> dict``;
this command prints the result on stdout as one JSON object (``--json``: one line; otherwise indented) and with
``--out`` writes it to a file (atomically; a ``FILE.partial`` the benchmark kept of its runs so far is removed). A
benchmark with ``table(result) -> str`` also prints that summary (a markdown table or a line) on stderr,
for people and notes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

BENCHES = {
    "model": "forward and train-step tokens/s for a model (optionally against transformers)",
    "kernels": "attention kernel sweep: TFLOP/s, GB/s, speed-up over XLA/cuDNN",
    "sample": "generated tokens/s and %% of roofline (optionally against transformers generate)",
    "train": "SFT train-step tokens/s and MFU (optionally against a torch AdamW step)",
    "data": "input pipeline tokens/s against the SFT step's consumption",
    "simulate": "the real workload (characters x questions, shared profiles), whole-process vs transformers",
    "cpu-kernels": "the CPU decode kernels (few-row matmul, decode attention) against XLA on a model's shapes",
}


def _module(name: str) -> str:
    return f"ditto_jax.bench.{name.replace('-', '_')}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its benchmarks."""
    parser = subparsers.add_parser("bench", help="benchmarks")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_text in BENCHES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--out", default=None, help="also write the JSON result to this file")
        p.set_defaults(func=_run, _bench=name)
        try:
            importlib.import_module(_module(name)).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != _module(name):
                raise


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(_module(args._bench))
    result = module.run(args)
    if isinstance(result, dict):  # the allocator this process ran with (ditto_jax.malloc); None: the system's
        result.setdefault("glibc_tunables", os.environ.get("GLIBC_TUNABLES"))
    text = json.dumps(result, indent=None if args.json else 2, sort_keys=False)
    if args.out:
        from pathlib import Path

        from ditto_jax.fileio import atomic_write_json

        atomic_write_json(args.out, result)
        Path(str(args.out) + ".partial").unlink(missing_ok=True)  # a benchmark's runs so far, now superseded
    table = getattr(module, "table", None)
    summary = table(result) if table is not None else ""
    if summary:
        print(summary, file=sys.stderr, flush=True)
    print(text)
    return 0
