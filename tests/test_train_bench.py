"""``bench train`` / ``bench model`` on the tiny preset: the shared measurement reports what the README quotes."""

from __future__ import annotations

import argparse

from ditto_jax.bench import model as bench_model
from ditto_jax.bench import train as bench_train


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--config", "model/tiny", "--batch", "8", "--seq-len", "32", "--rounds", "1",
                              "--compare-hf"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_bench_train_reports_tokens_mfu_and_the_torch_ratio() -> None:
    result = bench_train.run(_args(grad_accum=2, batch=16))
    assert result["grad_accum"] == 2 and result["batch"] == 16 and result["seq_len"] == 32
    assert result["tokens_per_s"] > 0 and result["hf_train_tokens_per_s"] > 0
    assert 0 < result["train_mfu"] < 1.5 and result["matmul_gflops"] > 0
    assert abs(result["train_ratio_vs_hf"] - result["tokens_per_s"] / result["hf_train_tokens_per_s"]) < 1e-9
    assert "forward_tokens_per_s" not in result
    assert result["machine"]["platform"] == "cpu"


def test_bench_model_adds_the_forward() -> None:
    result = bench_model.run(_args(compare_hf=False))
    assert result["forward_tokens_per_s"] > 0 and result["tokens_per_s"] > 0
    assert "hf_train_tokens_per_s" not in result
