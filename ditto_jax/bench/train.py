"""``ditto-jax bench train``: SFT train-step tokens/s and MFU (with gradient accumulation), optionally against
a torch AdamW step of transformers on the same weights; the measurement is ``bench model``'s train part."""

from __future__ import annotations

import argparse
from typing import Any

from ditto_jax.bench import model as bench_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bench model``'s arguments plus ``--grad-accum``."""
    bench_model.add_arguments(parser)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the real train step (fused loss, AdamW, donation) and report tokens/s and MFU."""
    result = bench_model.measure(args, accum=args.grad_accum, forward=False)
    result["command"] = "ditto-jax bench train " + " ".join(bench_model._argv(args))
    return result


def table(result: dict[str, Any]) -> str:
    """The ratio against a torch AdamW step in one line (empty without ``--compare-hf``)."""
    if "train_ratio_vs_hf" not in result:
        return ""
    return f"train step: {result['train_ratio_vs_hf']:.2f}x transformers (torch AdamW)"
