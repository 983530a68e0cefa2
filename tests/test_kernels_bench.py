"""The kernel benchmark harness and the GPU check script run end to end on CPU (interpreted kernels)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from ditto_jax.bench import kernels as bench_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_writes_json_markdown_and_plot(tmp_path):
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    args = parser.parse_args(["--preset", "cpu", "--iters", "1", "--warmup", "0", "--modes", "fwd",
                              "--out-dir", str(tmp_path)])
    result = bench_kernels.run(args)
    assert result["errors"] == 0, [r.get("error") for r in result["flash"] + result["decode"]]
    assert result["tflops"] > 0 and result["copy_gbs"] > 0 and result["peak_source"].startswith("measured")
    pallas = [r for r in result["flash"] if r["impl"] == "pallas:interpret"]
    assert len(pallas) == 4 and all(r["fwd_speedup_vs_xla"] > 0 for r in pallas)
    assert all(r["fwd_tflops"] > 0 and "fwd_pct_peak" in r for r in result["flash"])
    assert {r["impl"] for r in result["decode"]} == {"pallas:interpret", "xla"}
    assert all(r["gbs"] > 0 and r["pct_copy_bw"] > 0 for r in result["decode"])
    assert json.loads((tmp_path / "kernels.json").read_text())["flash"] == result["flash"]
    assert "| pallas:interpret |" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_check_script_small_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_kernels_check", ROOT / "scripts" / "gpu_kernels_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--small", "--out", str(tmp_path / "check.json")])
    assert report["summary"] == {"pass": 3, "fail": 0, "error": 0}, report
    assert json.loads((tmp_path / "check.json").read_text())["summary"] == report["summary"]
