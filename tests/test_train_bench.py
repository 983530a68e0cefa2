"""``bench train`` / ``bench model`` on the tiny preset: the shared measurement reports what the README quotes.

The torch comparison runs the real ``ditto-jax bench train --compare-hf --json`` in its own process: torch's
autograd thread pool next to XLA's in a long-lived pytest worker that has already run hundreds of tests once
crashed the worker (CI, 2026-12-04); the command itself always runs in a fresh process, and so does this test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ditto_jax.bench import model as bench_model
from ditto_jax.bench import train as bench_train


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--config", "model/tiny", "--batch", "8", "--seq-len", "32", "--rounds", "1"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_bench_train_reports_tokens_mfu_and_the_torch_ratio(tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ditto_jax.cli", "bench", "train", "--config", "model/tiny",
                           "--batch", "16", "--seq-len", "32", "--rounds", "1", "--grad-accum", "2", "--compare-hf",
                           "--json", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["grad_accum"] == 2 and result["batch"] == 16 and result["seq_len"] == 32
    assert result["tokens_per_s"] > 0 and result["hf_train_tokens_per_s"] > 0
    assert 0 < result["train_mfu"] < 1.5 and result["matmul_gflops"] > 0
    assert abs(result["train_ratio_vs_hf"] - result["tokens_per_s"] / result["hf_train_tokens_per_s"]) < 1e-9
    assert "forward_tokens_per_s" not in result
    assert result["machine"]["platform"] == "cpu"
    assert result["command"].startswith("ditto-jax bench train --config model/tiny")
    assert "x transformers (torch AdamW)" in proc.stderr


def test_bench_model_adds_the_forward() -> None:
    result = bench_model.run(_args())
    assert result["forward_tokens_per_s"] > 0 and result["tokens_per_s"] > 0
    assert "hf_train_tokens_per_s" not in result
