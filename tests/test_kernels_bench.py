"""The kernel benchmark harness and the GPU check script run end to end on CPU (interpreted kernels)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditto_jax.bench import cpu_kernels as bench_cpu_kernels
from ditto_jax.bench import kernels as bench_kernels
from ditto_jax.kernels import cpu as cpu_kernels

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
    assert report["summary"] == {"pass": 3, "fail": 0, "error": 0, "timeout": 0, "n/a": 0}, report
    assert json.loads((tmp_path / "check.json").read_text())["summary"] == report["summary"]


def test_gpu_check_script_goes_on_after_a_case_passes_its_time_limit(tmp_path):
    """A case past --case-timeout is recorded as timeout, its process ends, and a new one runs the next case
    (here every case is too slow for 0.5 s, so each one ends a child: the check still reaches all three)."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_kernels_check.py"), "--small", "--isolate",
                           "restart", "--case-timeout", "0.5", "--timeout", "120", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [e["status"] for e in report["entries"]] == ["timeout"] * 3, report
    assert [e["name"] for e in report["entries"]] == ["causal_gqa_unaligned", "segments_sq_lt_sk", "decode_small"]
    assert proc.stderr.count("TIMEOUT after 0 s") == 3


def test_gpu_check_script_cases_order_and_mosaic_applicability():
    spec = importlib.util.spec_from_file_location("gpu_kernels_check2", ROOT / "scripts" / "gpu_kernels_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = module._cases(["triton", "mosaic_gpu", "mosaic_gpu@mgpu_bwd=1", "auto"], module.GPU_FLASH,
                          module.GPU_DECODE, "gpu")
    keys = [(kind, backend) for kind, _, backend, _ in cases]
    # Round-robin: every lowering's first case before any second one (one hang cannot hide a lowering).
    assert keys[:4] == [("flash", b) for b in ("triton", "mosaic_gpu", "mosaic_gpu@mgpu_bwd=1", "auto")]
    assert [n for _, n, b, _ in cases if b == "triton"][:len(module.GPU_FLASH)] == list(module.GPU_FLASH)
    assert keys.count(("decode", "triton")) == len(module.GPU_DECODE)  # decode once per lowering
    assert len(cases) == len(set((k, n, b) for k, n, b, _ in cases)) == 24
    assert [n for k, n, b, _ in cases if b == "auto" and k == "flash"] == list(module.AUTO_FLASH)
    assert not module._mosaic_applicable("mosaic_gpu", module.GPU_FLASH["float32_causal_d64"])
    assert module._mosaic_applicable("triton", module.GPU_FLASH["float32_causal_d64"])
    assert module._drop_options(["--small", "--out", "x", "--isolate=off", "--resume", "--case-timeout", "3"],
                                {"--out", "--isolate"}, {"--resume"}) == ["--small", "--case-timeout", "3"]


def _check_module(name="gpu_kernels_check3"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "gpu_kernels_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_one_hung_backend_cannot_starve_the_others():
    """A backend past its share of --timeout (total / backends with cases left) waits while others have cases
    left; a timed-out case counts its case limit. The 2026-12-04 lease: Triton 52 s + 75 s (hung) of 160 s."""
    module = _check_module()
    spent = [{"backend": "triton", "status": "pass", "wall_s": 52.4},
             {"backend": "triton", "status": "timeout", "error": "no result after 75 s"}]
    backends = {"triton", "mosaic_gpu", "mosaic_gpu@mgpu_bwd=1", "auto"}
    assert module._share_spent("triton", spent, backends, 160.0, 75.0)  # 127.4 s >= 40 s
    assert not module._share_spent("mosaic_gpu", spent, backends, 160.0, 75.0)
    assert not module._share_spent("triton", spent[:1], {"triton"}, 160.0, 75.0)  # alone: all the time is its
    assert not module._share_spent("triton", spent, backends, 600.0, 75.0)  # 127.4 s < 150 s

    report = module._Report(None, {"backends": ["a", "b"], "entries": []})
    report.data["entries"].append({"kind": "flash", "name": "x", "backend": "a", "status": "timeout"})
    cases = [("flash", "y", "a", None), ("flash", "z", "a", None), ("flash", "x", "b", None),
             ("flash", "y", "b", None)]
    ran = []
    module._run_case = lambda kind, name, backend, spec, platform: ran.append((name, backend)) or {
        "kind": kind, "name": name, "backend": backend, "status": "pass", "wall_s": 1.0}
    module._run_in_process(cases, report, "cpu", case_timeout=75.0, total=100.0)
    # a is past its 50 s while b has cases left: b's cases first, then a's in the time that is left.
    assert ran == [("x", "b"), ("y", "b"), ("y", "a"), ("z", "a")]
    assert [e["status"] for e in report.data["entries"]] == ["timeout"] + ["pass"] * 4


def test_gpu_check_script_passes_arrays_as_arguments_not_constants():
    """Closed-over arrays become program constants that XLA constant-folds at compile time (what made the
    lease's non-causal case pass its limit): the programs take them as arguments."""
    import jax
    import jax.numpy as jnp

    module = _check_module("gpu_kernels_check4")
    kernel_run, ref_run = module.flash_programs(False, "interpret")
    x = jnp.ones((1, 64, 2, 32), jnp.float32)
    for fn in (kernel_run, ref_run):
        text = jax.jit(fn).lower(x, x, x, x, None).as_text()
        big = [line for line in text.splitlines() if "constant" in line and "64x2x32" in line]
        assert not big, big[:2]
        assert "tensor<1x64x2x32xf32>" in text.splitlines()[1] or "1x64x2x32" in text


@pytest.mark.skipif(not cpu_kernels.available(), reason=f"CPU kernels unavailable: {cpu_kernels.reason()}")
def test_bench_cpu_kernels_checks_and_times_both_paths(monkeypatch):
    """Both arms of every case, on a host that would decode with XLA's ops by default (the kernel arm still runs
    the kernels, and the result says what decoding uses here)."""
    monkeypatch.setattr(cpu_kernels._lib, "ditto_vector_bytes", lambda: 16)
    monkeypatch.delenv(cpu_kernels.DECODE_ENV, raising=False)
    parser = argparse.ArgumentParser()
    bench_cpu_kernels.add_arguments(parser)
    args = parser.parse_args(["--config", "model/tiny", "--layers", "2", "--batch", "3", "9", "--cache-len", "80",
                              "--rounds", "1", "--iters", "1"])
    result = bench_cpu_kernels.run(args)
    assert result["errors"] == 0, result["rows"]
    assert [(r["case"], r["batch"]) for r in result["rows"]] == [
        (case, b) for b in (3, 9) for case in ("matmul chain", "head", "attention", "prompt attention", "sampler")]
    for r in result["rows"]:
        assert r["xla_ms"] > 0 and r["kernel_ms"] > 0 and r["speedup"] > 0 and r["max_abs_diff"] < 1e-4
    sampler = result["rows"][4]
    assert sampler["vocab"] > 0 and 0.9 <= sampler["agree"] <= 1.0
    assert result["rows"][3]["new_tokens"] == 32 and result["rows"][3]["positions"][1] <= 80 - 32
    chain = result["rows"][0]
    assert chain["matrices"] == 2 * 4 + 1  # q/k/v, o, gate/up, down per layer, then the head
    assert 0.9 * 80 * 0.8 - 1 <= result["rows"][2]["positions"][0] <= result["rows"][2]["positions"][1] < 80
    assert result["rows"][3]["max_abs_diff"] > 0  # the kernel arm is not XLA's attention again
    assert result["decoding_by_default"].startswith("xla (") and cpu_kernels.DECODE_ENV not in os.environ
    text = bench_cpu_kernels.table(result)
    assert text.count("| matmul chain |") == 2 and "ERROR" not in text and "neither AVX2 nor AVX-512" in text
