"""The GPU tiling sweep, proven on CPU: tile specs parse (bad ones are named), every prepared variant is
well-formed and fits shared memory (Mosaic GPU ones lowered for cuda, which checks it exactly), the goal
summary and the best-forward + best-backward combination, the budget cut, the gpu_check plan and its
``kernels_tune`` section end to end, and the roofline probes of ``bench sample``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ditto_jax.bench import kernel_tuning as kt
from ditto_jax.bench import kernels as bench_kernels
from ditto_jax.kernels import BlockSizes, DecodeBlockSizes
from ditto_jax.kernels._config import default_blocks, default_decode_blocks, parse_backend_spec, parse_decode_spec

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ spec parsing
def test_decode_spec_parses_tiles_over_the_defaults():
    backend, blocks = parse_decode_spec("triton@block_kv=64;num_splits=8;num_stages=3")
    assert backend == "triton"
    assert blocks == DecodeBlockSizes(block_kv=64, num_splits=8, num_warps=4, num_stages=3)
    assert parse_decode_spec("triton") == ("triton", None)
    assert kt.parse_decode_impl("pallas:triton@num_splits=none")[1].num_splits is None


def test_h200_decode_default_is_the_tiling_the_2026_12_04_lease_measured_fastest(monkeypatch):
    from ditto_jax.kernels._config import DEFAULT_DECODE_BLOCKS

    monkeypatch.delenv("DITTO_DECODE_BLOCKS", raising=False)
    lease = json.loads((ROOT / "benchmarks" / "gpu-h200-2026-12-04" / "kernels_tune.json").read_text())
    assert lease["device"]["device_kind"] == "NVIDIA H200"
    best = lease["summary"]["decode_recommended"]
    rows = {r["impl"]: r["pct_copy_bw"] for r in lease["decode"] if "pct_copy_bw" in r}
    assert best == max(rows, key=rows.get) and rows[best] > rows["pallas:triton"]  # 61.5% vs 54.3%
    h200 = DEFAULT_DECODE_BLOCKS["NVIDIA H200"]
    assert kt.parse_decode_impl(best) == ("triton", h200)
    assert h200 == DecodeBlockSizes(block_kv=64, num_splits=8, num_warps=4, num_stages=4)
    assert default_decode_blocks(device_kind="NVIDIA H200") == h200
    # Every other device keeps the generic tiles; the environment and an explicit argument still win.
    assert default_decode_blocks(device_kind="cpu") == DecodeBlockSizes()
    assert default_decode_blocks(device_kind="TPU v5 lite") == DecodeBlockSizes()
    assert default_decode_blocks() == DecodeBlockSizes()  # this machine: CPU
    monkeypatch.setenv("DITTO_DECODE_BLOCKS", "num_splits=2")
    assert default_decode_blocks(device_kind="NVIDIA H200") == h200.replace(num_splits=2)
    assert default_decode_blocks(DecodeBlockSizes(block_kv=16), device_kind="NVIDIA H200").block_kv == 16
    # A spec names the same tiles on every device (over the generic defaults, not the device's).
    assert parse_decode_spec("triton@num_warps=8")[1] == DecodeBlockSizes(num_warps=8, num_splits=2)  # env first


@pytest.mark.parametrize("spec,message", [
    ("triton@num_split=8", r"unknown DecodeBlockSizes fields \['num_split'\]"),
    ("triton@block_kv=48", "block_kv=48 must be a power of two >= 16"),
    ("triton@num_warps=eight", "num_warps='eight' is not an integer"),
    ("triton@num_warps=3", "num_warps=3 must be a power of two"),
    ("triton@num_stages=0", "num_stages=0 must be positive"),
    ("cuda@block_kv=64", "backend 'cuda' not in"),
])
def test_bad_decode_spec_names_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_decode_spec(spec)


@pytest.mark.parametrize("spec,message", [
    ("triton@block_z=32", r"unknown BlockSizes fields \['block_z'\]"),
    ("mosaic_gpu@block_kv=96", "block_kv=96 must be a multiple of 64"),
    ("mosaic_gpu@mgpu_bwd=1;block_kv_dq=32", "block_kv_dq=32 must be a multiple of 64"),
    ("mosaic_gpu@block_q_dq=48", "block_q_dq=48 must be a power of two >= 16"),  # its Triton backward
    ("triton@mgpu_bwd=2", "mgpu_bwd=2 must be 0 or 1"),
])
def test_bad_flash_spec_names_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_backend_spec(spec)


def test_bench_rejects_a_bad_decode_impl_before_compiling(tmp_path):
    args = _bench_args(tmp_path, "--decode-impls", "pallas:triton@block_kv=64;num_splitz=2", "--no-flash")
    with pytest.raises(ValueError, match="num_splitz"):
        bench_kernels.run(args)


# ------------------------------------------------------------------------------------------ variant lists
def _variants(table):
    return [spec for spec, _ in table if spec.startswith("pallas")]


def test_tune_variants_are_few_distinct_explained_and_fit_shared_memory():
    flash, decode = _variants(kt.TUNE_FLASH), _variants(kt.TUNE_DECODE)
    assert 6 <= len(flash) <= 12 and 4 <= len(decode) <= 6
    assert len(set(flash)) == len(flash) and len(set(decode)) == len(decode)
    assert all(len(why) > 10 for _, why in kt.TUNE_FLASH + kt.TUNE_DECODE)
    assert {"cudnn"} <= {s for s, _ in kt.TUNE_FLASH} and "xla" in {s for s, _ in kt.TUNE_DECODE}
    backends, mgpu_bwd = set(), False
    canonical = set()
    for spec in flash:
        backend, blocks = kt.parse_flash_impl(spec)  # raises naming the field when a tile is invalid
        blocks = blocks or default_blocks(backend)
        assert isinstance(blocks, BlockSizes) and backend in ("triton", "mosaic_gpu")
        backends.add(backend)
        mgpu_bwd |= bool(blocks.mgpu_bwd)
        canonical.add((backend, blocks))
        for kernel, nbytes in kt.flash_smem_bytes(backend, blocks).items():
            assert nbytes <= kt.SMEM_LIMIT_BYTES, (spec, kernel, nbytes)
    assert len(canonical) == len(flash), "two variants spell the same tiling"
    assert backends == {"triton", "mosaic_gpu"} and mgpu_bwd
    for spec in decode:
        backend, blocks = kt.parse_decode_impl(spec)
        blocks = blocks or default_decode_blocks()
        assert isinstance(blocks, DecodeBlockSizes) and backend == "triton"
        assert kt.decode_smem_bytes(blocks) <= kt.SMEM_LIMIT_BYTES, spec
    # The small CPU lists parse too (they run in test_gpu_check_tune_section_runs_on_cpu).
    for spec in _variants(kt.TUNE_FLASH_SMALL):
        kt.parse_flash_impl(spec)
    for spec in _variants(kt.TUNE_DECODE_SMALL):
        kt.parse_decode_impl(spec)


def test_mosaic_gpu_tune_variants_lower_for_cuda_within_shared_memory():
    """Lowering a Mosaic GPU kernel checks its exact shared memory against 227 KB, also on CPU."""
    from jax import export

    from ditto_jax.kernels import flash_attention

    checks = [export.DisabledSafetyCheck.custom_call(n) for n in ("__gpu$xla.gpu.triton", "mosaic_gpu",
                                                                   "mosaic_gpu_v2")]
    q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)

    def lower(spec: str) -> None:
        backend, blocks = kt.parse_flash_impl(spec)

        def fwd_bwd(q, k, v):
            o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True, backend=backend,
                                                              block_sizes=blocks), q, k, v)
            return o, vjp(o)

        export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=checks)(q, q, q)

    for spec in _variants(kt.TUNE_FLASH):
        if "mosaic_gpu" in spec:
            lower(spec)
    with pytest.raises(ValueError, match="exceeds available shared memory"):  # the config left out of the list
        lower("pallas:mosaic_gpu@max_concurrent_steps=3")


# ------------------------------------------------------------------------------------------ goal summary
GOAL = dict(batch=2, seq=8192, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16")
DECODE = dict(batch=32, cache=8192, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
MGPU = "pallas:mosaic_gpu@mgpu_bwd=1"
MGPU64 = "pallas:mosaic_gpu@block_kv=64;max_concurrent_steps=4;mgpu_bwd=1"
TRITON_B = "pallas:triton@block_q_dq=128;block_kv_dq=32;block_q_dkv=32;block_kv_dkv=128;num_stages_bwd=3"


def _row(impl: str, causal: bool, fwd_ms: float, bwd_ms: float | None) -> dict:
    flops = 4.0 * 2 * 16 * 8192 * 8192 * 128 * (0.5 if causal else 1.0)
    row = {**GOAL, "causal": causal, "impl": impl, "fwd_ms": fwd_ms, "fwd_tflops": flops / fwd_ms / 1e9}
    if bwd_ms is not None:
        row.update(bwd_ms=bwd_ms, bwd_tflops=2.5 * flops / bwd_ms / 1e9)
    return row


def _summary(rows, decode_rows=()):
    goal_flash = [{**GOAL, "causal": c} for c in (True, False)]
    return kt.summarize(list(rows), list(decode_rows), goal_flash, [DECODE], 3000.0)


def test_summary_picks_the_best_variant_per_pass_and_judges_the_goals():
    rows = [_row("cudnn", True, 1.0, 2.0), _row("cudnn", False, 2.0, 4.0),
            _row(MGPU, True, 0.9, 3.0), _row(MGPU, False, 2.2, 5.0),
            _row(MGPU64, True, 1.1, 2.4), _row(MGPU64, False, 2.1, 4.4),
            _row("pallas:triton", True, 1.5, 2.5), {**GOAL, "causal": False, "impl": "pallas:triton", "error": "x"}]
    decode = [{**DECODE, "impl": "xla", "ms": 2.0, "gbs": 900.0, "pct_copy_bw": 30.0},
              {**DECODE, "impl": "pallas:triton", "ms": 0.5, "gbs": 2100.0, "pct_copy_bw": 70.0},
              {**DECODE, "impl": "pallas:triton@block_kv=64;num_stages=3", "ms": 0.42, "gbs": 2500.0,
               "pct_copy_bw": 83.3}]
    s = _summary(rows, decode)
    g = {x["goal"]: x for x in s["goals"]}
    assert g["forward, causal"]["impl"] == MGPU and g["forward, causal"]["met"] is True
    assert g["forward, causal"]["x_cudnn"] == pytest.approx(1.0 / 0.9)
    assert g["forward, non-causal"]["impl"] == MGPU64 and g["forward, non-causal"]["met"] is False
    assert g["backward, causal"]["impl"] == MGPU64  # 2.4 ms beats triton's 2.5
    causal_bwd_tflops = 2.5 * 4.0 * 2 * 16 * 8192 * 8192 * 128 * 0.5 / 2.4e9
    assert g["backward, causal"]["met"] is (causal_bwd_tflops >= kt.GOAL_BWD_TFLOPS)
    assert g["decode"]["impl"].endswith("num_stages=3") and g["decode"]["met"] is True
    assert g["decode"]["x_xla"] == pytest.approx(2.0 / 0.42)
    assert s["met"] + s["not_met"] + s["unknown"] == 5
    # Triton has an error row at one goal case: it cannot be recommended (not measured everywhere).
    assert s["best_fwd"] == MGPU and s["best_bwd"] == MGPU64 and s["recommended"] == MGPU64
    # Same lowering: the fastest forward's tiles with the fastest backward's tiles (the ring depth is shared).
    assert s["combined"] == MGPU and s["combined_measured"], s
    md = kt.goals_markdown(s)
    assert "| forward, causal | >= 1.00x cuDNN | pallas:mosaic_gpu@mgpu_bwd=1 | 1.11x cuDNN" in md
    assert "| met |" in md and "| NOT met |" in md and "Goals met: " in md


def test_combination_rules():
    spec, note = kt.combine(MGPU, TRITON_B)  # Mosaic forward with the Triton backward it runs by default
    assert spec.startswith("pallas:mosaic_gpu@") and "block_q_dq=128" in spec and "num_stages_bwd=3" in spec
    backend, blocks = kt.parse_flash_impl(spec)
    assert (backend, blocks.block_kv, blocks.mgpu_bwd, blocks.dq, blocks.dkv) == ("mosaic_gpu", 128, 0, (128, 32),
                                                                                  (32, 128))
    none, why = kt.combine("pallas:triton", MGPU)
    assert none is None and "Mosaic GPU forward" in why
    assert kt.combine(MGPU, MGPU) == (MGPU, "one variant is fastest in both passes")


def test_summary_without_cudnn_or_measurements_says_so():
    s = _summary([_row(MGPU, True, 1.0, None), _row(MGPU, False, 2.0, None)])
    g = {x["goal"]: x for x in s["goals"]}
    assert g["forward, causal"]["met"] is None and g["backward, causal"]["impl"] is None
    assert g["decode"]["met"] is None and s["unknown"] == 5
    assert "no cuDNN row" in kt.goals_markdown(s) and s["recommended"] == MGPU


# ------------------------------------------------------------------------------------------ budget, plan
def _bench_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    return parser.parse_args(["--preset", "cpu-tiny", "--impls", "tune-small", "--decode-impls", "tune-small",
                              "--iters", "1", "--warmup", "0", "--modes", "fwd", "--out-dir", str(tmp_path), *extra])


def test_spent_budget_skips_every_entry_and_still_writes_the_report(tmp_path):
    result = bench_kernels.run(_bench_args(tmp_path, "--budget", "0"))
    rows = result["flash"] + result["decode"]
    assert rows and all(r.get("skipped") == "run budget spent" for r in rows)
    assert result["skipped"] == len(rows) == 2 * 3 + 3 and result["errors"] == 0 and not result["partial"]
    assert json.loads((tmp_path / "kernels.json").read_text())["skipped"] == len(rows)
    md = (tmp_path / "kernels.md").read_text()
    assert "skipped: run budget spent" in md and "Goals met: 0 of 5" in md


def test_gpu_check_plan_reserves_later_sections_for_the_sweeps(tmp_path):
    gc = _gpu_check()
    secs = gc.sections(False, tmp_path)
    names = [s.name for s in secs]
    assert names.index("kernels_check") < names.index("kernels_tune") < names.index("train_seq4096_pallas")
    assert names[-1] == "kernels_bench"
    tune = names.index("kernels_tune")
    later = sum(s.typical_s for s in secs[tune + 1:])
    limit, budget = gc.plan_limit(secs, tune, 385.0, None)
    assert limit == pytest.approx(385.0 - later) and budget == pytest.approx(limit - gc.SWEEP_GRACE_S)
    assert gc.plan_limit(secs, tune, None, None) == (secs[tune].timeout, secs[tune].timeout - gc.SWEEP_GRACE_S)
    assert gc.plan_limit(secs, names.index("train_seq4096_pallas"), 30.0, None) == (30.0, None)
    triton = secs[names.index("train_seq4096_triton")]
    assert triton.env == {"DITTO_ATTN_BACKEND": "triton"} and triton.cmd == secs[names.index("train_seq4096_pallas")].cmd
    check = secs[names.index("kernels_check")]  # keeps its own time: told to finish inside its limit
    assert gc._with_time_flag(check, check.cmd, 120.0)[-2:] == ["--timeout", "110"]
    # Nothing but the results under the output folder: configs and the length sweep go to the scratch folder.
    assert not any(tmp_path.iterdir()) or {p.name for p in tmp_path.iterdir()} <= {"scratch"}
    cmd = gc._command(secs[-1], {"sections": {"kernels_tune": {"result": {"summary": {"recommended": MGPU64}}}}},
                      70.0)
    assert cmd[cmd.index("--impls") + 1] == f"pallas,cudnn,{MGPU64}" and cmd[-2:] == ["--budget", "70"]
    tune_cmd = " ".join(secs[tune].cmd)
    assert "--impls tune --decode-impls tune" in tune_cmd and "--isolate restart" in tune_cmd
    assert "--entry-timeout 90" in tune_cmd and "--isolate restart" in " ".join(secs[-1].cmd)


def test_gpu_check_tune_section_runs_on_cpu(tmp_path):
    gc = _gpu_check()
    assert gc.main(["--small", "--only", "kernels_tune", "--out", str(tmp_path), "--budget", "400",
                    "--scratch", str(tmp_path.parent / "scratch")]) == 0
    report = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    sec = report["sections"]["kernels_tune"]
    assert sec["returncode"] == 0, sec
    result = sec["result"]
    assert result["errors"] == 0 and result["skipped"] == 0 and not result["partial"]
    assert {r["impl"] for r in result["decode"]} == {s for s, _ in kt.TUNE_DECODE_SMALL}
    assert {r["impl"] for r in result["flash"]} == {s for s, _ in kt.TUNE_FLASH_SMALL}
    assert all(r["seconds"] > 0 for r in result["flash"] + result["decode"])
    goals = {g["goal"]: g for g in result["summary"]["goals"]}
    assert goals["decode"]["impl"] is not None and goals["decode"]["met"] is False  # interpreted: far from 80%
    assert goals["forward, causal"]["met"] is None  # no cuDNN on CPU
    md = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "goals met 0 of 5" in md and "| decode | >= 80% of copy bandwidth |" in md and "NOT met" in md
    assert "Goals met: 0 of 5" in (tmp_path / "kernels_tune" / "kernels.md").read_text()
    # What the device tool brings back: at most 8 files, at most 2 folders down (configs went to scratch).
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(f.count("/") <= 2 for f in files), files
    assert "sections.log" in files and "=== kernels_tune:" in (tmp_path / "sections.log").read_text()


# ------------------------------------------------------------------------------------------ bench sample
def test_roofline_probes_saturate_accelerators_and_keep_the_cpu_probe():
    from ditto_jax.bench import sample

    gpu = sample.roofline_probes("gpu", "bfloat16")
    assert gpu.read_elements * 2 >= 2 << 30 and gpu.copy_elements * 2 >= 2 << 30
    assert (gpu.matmul_n, gpu.dtype, gpu.with_torch) == (8192, "bfloat16", False)
    cpu = sample.roofline_probes("cpu", "bfloat16")
    assert (cpu.read_elements * 4, cpu.matmul_n, cpu.dtype, cpu.with_torch) == (128 << 20, 1024, "float32", True)
    assert cpu.describe()["bandwidth_probe"] == "read: 128 MiB float32 sum; best of 4"
    assert gpu.describe()["matmul_probe"] == "8192^3 bfloat16 matmul, best of 10"
    # The accelerator code path (read and copy, compute dtype) runs here at a small size.
    small = dataclasses.replace(gpu, read_elements=1 << 20, copy_elements=1 << 20, matmul_n=128,
                                bandwidth_repeats=2, matmul_repeats=2)
    bandwidth, which = sample._measure_bandwidth(small)
    assert bandwidth > 0 and which in ("read", "copy")
    assert sample._measure_matmul_rate(small) > 0


def test_gpu_check_markdown_names_what_did_not_pass_and_autos_lowering():
    gc = _gpu_check()
    entries = [{"kind": "flash", "name": "a", "backend": "triton", "status": "pass"},
               {"kind": "flash", "name": "b", "backend": "mosaic_gpu", "status": "timeout", "error": "no result"},
               {"kind": "flash", "name": "c", "backend": "auto", "status": "pass", "auto_lowering": "mosaic_gpu"}]
    report = {"device": "NVIDIA H200", "date": "2026-12-04", "sections": {
        "kernels_check": {"returncode": 0, "seconds": 1.0,
                          "result": {"summary": {"pass": 2, "timeout": 1}, "entries": entries}},
        "train_seq4096_pallas": {"returncode": 0, "seconds": 2.0, "result": {"tokens_per_s": 5.0, "train_mfu": 0.4},
                                 "kernel_warnings": ["flash_attention: Mosaic GPU self-check failed (x)"]}}}
    md = gc.markdown(report)
    assert "| kernels_check | ok | 1.0 | pass=2, timeout=1 |" in md
    assert "- flash `mosaic_gpu` b: timeout no result" in md and "- flash `auto` c: pass, auto used mosaic_gpu" in md
    assert "train_mfu=0.4" in md and "self-check failed (x)" in md and "`triton` a" not in md


def test_gpu_check_sweeps_skip_only_the_lowering_and_mask_whose_check_hung(tmp_path):
    """The 2026-12-04 lease: the non-causal Triton case hung, 21 others were never reached; the sweeps then
    skip Triton (and the Mosaic GPU forward whose backward is Triton) at non-causal only, and run the rest."""
    gc = _gpu_check()
    secs = gc.sections(False, tmp_path)
    tune = next(s for s in secs if s.name == "kernels_tune")
    lease = json.loads((ROOT / "benchmarks" / "gpu-h200-2026-12-04" / "kernels_check.json").read_text())
    report = {"sections": {"kernels_check": {"result": lease}}}
    assert gc._hung_pairs(report) == {("triton", False)}
    cmd = gc._command(tune, report, None)
    assert cmd[:len(tune.cmd)] == tune.cmd and cmd[len(tune.cmd):] == ["--skip-flash", "triton:noncausal"]
    assert gc._command(tune, {"sections": {}}, None) == tune.cmd  # nothing hung: the prepared command unchanged
    mgpu = {"kind": "flash", "name": "causal_gqa4_d128", "backend": "mosaic_gpu@mgpu_bwd=1", "status": "timeout",
            "causal": True, "error": "no result after 75 s"}
    auto = {**mgpu, "backend": "auto"}  # auto's lowering is one of the others: not a lowering to skip
    assert gc._hung_pairs({"sections": {"kernels_check": {"result": {"entries": [mgpu, auto]}}}}) == {
        ("mosaic_gpu@mgpu_bwd=1", True)}
    skips = bench_kernels.parse_skip_flash("triton:noncausal,mosaic_gpu@mgpu_bwd=1:causal")
    assert skips == [("triton", False), ("mosaic_gpu@mgpu_bwd=1", True)]
    reason = bench_kernels._skip_reason
    assert reason("pallas:triton@block_q=64", False, skips) and not reason("pallas:triton", True, skips)
    assert reason("pallas:mosaic_gpu", False, skips)  # its backward is Triton
    assert not reason("pallas:mosaic_gpu@mgpu_bwd=1", False, skips)
    assert reason("pallas:mosaic_gpu@mgpu_bwd=1", True, skips) and not reason("cudnn", False, skips)
    with pytest.raises(ValueError, match="'triton:both' is not LOWERING:causal"):
        bench_kernels.parse_skip_flash("triton:both")
    assert gc._runs_hung("pallas:mosaic_gpu", {"triton"}) and not gc._runs_hung("pallas:mosaic_gpu@mgpu_bwd=1",
                                                                                  {"triton"})


def test_sweep_records_a_hung_entry_as_timeout_and_a_fresh_process_goes_on(tmp_path):
    """--isolate restart: every entry here passes its 0.01 s limit, so each one ends a child (recorded as a
    timeout row) and the next child resumes after it; skipped entries are not run at all."""
    args = _bench_args(tmp_path, "--isolate", "restart", "--entry-timeout", "0.01", "--no-decode")
    args.impls = "pallas:interpret"
    result = bench_kernels.run(args)
    rows = result["flash"]
    assert [(r["causal"], r.get("timeout"), r["error"]) for r in rows] == [
        (c, True, "timeout after 0 s (hung, or compiling took too long)") for c in (True, False)]
    assert result["restarts"] == 2 and result["errors"] == 2
    args = _bench_args(tmp_path / "skip", "--isolate", "off", "--skip-flash", "triton:noncausal", "--no-decode",
                       "--budget", "0")
    args.impls = "pallas:triton"  # parses on CPU; never compiled: skipped (mask) or budget spent
    rows = bench_kernels.run(args)["flash"]
    skipped = {r["causal"]: r["skipped"] for r in rows}
    assert skipped[True] == "run budget spent" and skipped[False].startswith("--skip-flash: runs triton non-causal")
