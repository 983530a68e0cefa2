"""``ditto-jax bench kernels``: attention kernels against XLA (and cuDNN on GPU).

Flash attention: time, TFLOP/s (``4·B·H·Sq·Sk·D`` for the forward, halved when causal; the backward counts
2.5x the forward: five matmuls against two; backward time = forward+backward time minus forward time), % of
the device's dense bf16 peak (CPU: a matmul measured in the same run), and speed-ups against the XLA
reference and cuDNN. Decode: GB/s (K and V bytes read up to each row's length, plus q and o) and % of the
device-to-device copy bandwidth measured in the same run. Every entry is measured in its own try block: an
implementation that fails to lower is reported with its error and the sweep goes on.

Writes ``kernels.json``, ``kernels.md`` (tables) and ``kernels.png`` (TFLOP/s against sequence length) to
``--out-dir``. ``--preset cpu`` runs small shapes with the interpreted kernels (it proves the harness, its
figures say nothing about kernel speed); ``--preset gpu`` the goal shapes plus a sequence-length sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable

PEAK_TFLOPS = {  # dense bf16
    "H100": 989.0,
    "H200": 989.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
}


@dataclasses.dataclass(frozen=True)
class FlashCase:
    """One flash-attention shape."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    dtype: str


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One decode shape (every row uses the full cache length)."""

    batch: int
    cache: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str


def _presets(name: str) -> tuple[list[FlashCase], list[DecodeCase]]:
    if name == "cpu":
        flash = [FlashCase(1, s, 2, 1, 64, c, "float32") for s in (128, 256) for c in (True, False)]
        return flash, [DecodeCase(2, 512, 4, 1, 64, "float32")]
    if name in ("gpu", "tpu"):
        flash = [FlashCase(2, 8192, 16, 16, 128, c, "bfloat16") for c in (True, False)]
        flash += [FlashCase(16384 // s, s, 16, 16, 128, True, "bfloat16") for s in (1024, 2048, 4096)]
        return flash, [DecodeCase(32, 8192, 32, 8, 128, "bfloat16")]
    raise ValueError(f"unknown preset {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--preset", choices=["cpu", "gpu", "tpu"], default=None,
                        help="shape set (default: by platform)")
    parser.add_argument("--impls", default=None,
                        help="comma list of pallas[:backend][@tile=N;...] | xla | cudnn (default: by platform)")
    parser.add_argument("--modes", default="fwd,bwd", help="comma list of fwd, bwd")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per entry (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", default="benchmarks/kernels", help="where kernels.{json,md,png} go")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                        help="run each impl in a child process with --impl-timeout (auto: on for GPU), so a "
                             "kernel that hangs or crashes the process costs only its own rows")
    parser.add_argument("--impl-timeout", type=float, default=240.0, help="seconds per isolated impl")


def _default_impls(platform: str) -> list[str]:
    if platform == "gpu":
        return ["pallas:mosaic_gpu", "pallas:mosaic_gpu@mgpu_bwd=1", "pallas:triton", "cudnn", "xla"]
    if platform == "tpu":
        return ["pallas:mosaic_tpu", "xla"]
    return ["pallas:interpret", "xla"]


def _time(fn: Callable, args: tuple, iters: int, warmup: int) -> float:
    """Median seconds of ``fn(*args)`` (compiled once, outputs awaited)."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "cpu")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    return {"platform": jax.default_backend(), "device_kind": kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "peak_tflops": peak}


def _measure_matmul_tflops(iters: int) -> float:
    import jax
    import jax.numpy as jnp

    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    t = _time(lambda x, y: x @ y, (a, a), iters, 1)
    del jax
    return 2 * n**3 / t / 1e12


def _measure_copy_gbs(platform: str, iters: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    import jax.numpy as jnp

    n = (1 << 29) if platform in ("gpu", "tpu") else (1 << 24)  # 1 GiB / 64 MiB of float32... /2 for bf16
    x = jnp.zeros((n,), jnp.float32)
    t = _time(lambda a: a + 1.0, (x,), iters, 1)
    return 2 * x.nbytes / t / 1e9


def _flash_fn(impl: str, causal: bool) -> Callable:
    import jax

    from ditto_jax.kernels import attention_reference, flash_attention

    if impl == "xla":
        return lambda q, k, v: attention_reference(q, k, v, causal=causal)
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    backend, blocks = _parse_pallas_impl(impl)
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend, block_sizes=blocks)


def _parse_pallas_impl(impl: str):
    """``pallas[:backend][@field=value;...]`` -> ``(backend or None, BlockSizes or None)``."""
    from ditto_jax.kernels._config import parse_backend_spec

    _, _, spec = impl.partition(":")
    if impl.startswith("pallas@"):
        spec = impl[len("pallas"):]
    return parse_backend_spec(spec)


def _flash_entry(case: FlashCase, impl: str, modes: list[str], iters: int, warmup: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 4)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.batch, case.seq, case.heads, case.head_dim), dtype)
    k = jax.random.normal(ks[1], (case.batch, case.seq, case.kv_heads, case.head_dim), dtype)
    v = jax.random.normal(ks[2], (case.batch, case.seq, case.kv_heads, case.head_dim), dtype)
    fn = _flash_fn(impl, case.causal)
    fwd_flops = 4.0 * case.batch * case.heads * case.seq * case.seq * case.head_dim * (0.5 if case.causal else 1.0)
    row: dict[str, Any] = {**dataclasses.asdict(case), "impl": impl}
    t_fwd = _time(fn, (q, k, v), iters, warmup)
    row["fwd_ms"] = t_fwd * 1e3
    row["fwd_tflops"] = fwd_flops / t_fwd / 1e12
    if "bwd" in modes:
        def fwd_bwd(q, k, v):
            o, vjp = jax.vjp(fn, q, k, v)
            return vjp(o)

        t_all = _time(fwd_bwd, (q, k, v), iters, warmup)
        t_bwd = max(t_all - t_fwd, 1e-9)
        row["bwd_ms"] = t_bwd * 1e3
        row["bwd_tflops"] = 2.5 * fwd_flops / t_bwd / 1e12
    return row


def _decode_entry(case: DecodeCase, impl: str, iters: int, warmup: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from ditto_jax.kernels import decode_attention, decode_reference

    ks = jax.random.split(jax.random.key(1), 3)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.batch, case.heads, case.head_dim), dtype)
    kc = jax.random.normal(ks[1], (case.batch, case.cache, case.kv_heads, case.head_dim), dtype)
    vc = jax.random.normal(ks[2], (case.batch, case.cache, case.kv_heads, case.head_dim), dtype)
    lengths = jnp.full((case.batch,), case.cache, jnp.int32)
    if impl == "xla":
        fn = decode_reference
    else:
        _, _, backend = impl.partition(":")
        fn = lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend or None)  # noqa: E731
    t = _time(fn, (q, kc, vc, lengths), iters, warmup)
    nbytes = kc.nbytes + vc.nbytes + 2 * q.nbytes
    return {**dataclasses.asdict(case), "impl": impl, "ms": t * 1e3, "gbs": nbytes / t / 1e9}


def _add_ratios(rows: list[dict[str, Any]], key_fields: tuple[str, ...], metric: str, out: str, base: str) -> None:
    """``row[out] = base_time / row_time`` for rows sharing ``key_fields`` with a ``base`` impl row."""
    index = {tuple(r.get(f) for f in key_fields): r for r in rows if r.get("impl") == base and metric in r}
    for r in rows:
        ref = index.get(tuple(r.get(f) for f in key_fields))
        if ref is not None and metric in r and r is not ref:
            r[out] = ref[metric] / r[metric]


def _markdown(result: dict[str, Any]) -> str:
    dev = result["device"]
    lines = [f"# Attention kernels on {dev['device_kind']} ({dev['platform']}, jax {dev['jax_version']})", "",
             f"Peak used for %: {result['peak_tflops']:.3g} TFLOP/s ({result['peak_source']}); copy bandwidth "
             f"{result['copy_gbs']:.1f} GB/s.", "",
             *(["CPU: the Pallas kernels run in the interpreter; these figures prove the harness, not kernel speed.",
                ""] if dev["platform"] == "cpu" else []),
             "| B | S | H/Hkv | D | causal | dtype | impl | fwd ms | fwd TFLOP/s | fwd % peak | bwd ms | "
             "bwd TFLOP/s | bwd % peak | fwd x XLA | fwd x cuDNN | bwd x XLA | bwd x cuDNN |",
             "|" + "---|" * 17]
    fmt = lambda x, f="{:.2f}": "" if x is None else (f.format(x) if isinstance(x, float) else str(x))  # noqa: E731
    for r in result["flash"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['seq']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                         f"{r['causal']} | {r['dtype']} | {r['impl']} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        lines.append("| " + " | ".join([
            str(r["batch"]), str(r["seq"]), f"{r['heads']}/{r['kv_heads']}", str(r["head_dim"]), str(r["causal"]),
            r["dtype"], r["impl"], fmt(r.get("fwd_ms"), "{:.3f}"), fmt(r.get("fwd_tflops")),
            fmt(r.get("fwd_pct_peak"), "{:.1f}"), fmt(r.get("bwd_ms"), "{:.3f}"), fmt(r.get("bwd_tflops")),
            fmt(r.get("bwd_pct_peak"), "{:.1f}"), fmt(r.get("fwd_speedup_vs_xla")), fmt(r.get("fwd_speedup_vs_cudnn")),
            fmt(r.get("bwd_speedup_vs_xla")), fmt(r.get("bwd_speedup_vs_cudnn"))]) + " |")
    if result["decode"]:
        lines += ["", "| B | cache | Hq/Hkv | D | dtype | impl | ms | GB/s | % copy bw | x XLA |", "|" + "---|" * 10]
        for r in result["decode"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['cache']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                             f"{r['dtype']} | {r['impl']} | error: {r['error'][:80]} | | | |")
                continue
            lines.append(f"| {r['batch']} | {r['cache']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                         f"{r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.1f} | {r['pct_copy_bw']:.1f} | "
                         f"{fmt(r.get('speedup_vs_xla'))} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str, bool], list[tuple[int, float]]] = {}
    for r in result["flash"]:
        for mode in ("fwd", "bwd"):
            if f"{mode}_tflops" in r:
                series.setdefault((r["impl"], mode, r["causal"]), []).append((r["seq"], r[f"{mode}_tflops"]))
    for (impl, mode, causal), pts in sorted(series.items()):
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if mode == "fwd" else "--",
                label=f"{impl} {mode}{' causal' if causal else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"attention on {result['device']['device_kind']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep, write JSON/markdown/PNG to ``--out-dir`` and return the result."""
    device = _device_info()
    platform = device["platform"]
    preset = args.preset or ("gpu" if platform == "gpu" else "tpu" if platform == "tpu" else "cpu")
    flash_cases, decode_cases = _presets(preset)
    impls = args.impls.split(",") if args.impls else _default_impls(platform)
    modes = [m for m in args.modes.split(",") if m]
    iters = args.iters or (20 if platform in ("gpu", "tpu") else 3)
    copy_gbs = _measure_copy_gbs(platform, max(iters, 5))
    peak = device["peak_tflops"]
    peak_source = "table"
    if peak is None:
        peak, peak_source = _measure_matmul_tflops(max(iters, 5)), "measured float32 1024^3 matmul"

    isolate = args.isolate == "on" or (args.isolate == "auto" and platform == "gpu" and len(impls) > 1)
    if isolate:
        flash_rows, decode_rows = _run_isolated(args, preset, impls, flash_cases, decode_cases)
        for row in flash_rows:
            for mode in ("fwd", "bwd"):
                if f"{mode}_tflops" in row:
                    row[f"{mode}_pct_peak"] = 100.0 * row[f"{mode}_tflops"] / peak
        for row in decode_rows:
            if "gbs" in row:
                row["pct_copy_bw"] = 100.0 * row["gbs"] / copy_gbs
    else:
        flash_rows, decode_rows = _run_here(args, platform, impls, modes, iters, flash_cases, decode_cases, peak,
                                            copy_gbs)
    keys = ("batch", "seq", "heads", "kv_heads", "head_dim", "causal", "dtype")
    for mode in ("fwd", "bwd"):
        _add_ratios(flash_rows, keys, f"{mode}_ms", f"{mode}_speedup_vs_xla", "xla")
        _add_ratios(flash_rows, keys, f"{mode}_ms", f"{mode}_speedup_vs_cudnn", "cudnn")
    _add_ratios(decode_rows, ("batch", "cache", "heads", "kv_heads", "head_dim", "dtype"), "ms",
                "speedup_vs_xla", "xla")
    return _finish(args, device, preset, peak, peak_source, copy_gbs, iters, flash_rows, decode_rows)


def _decode_impls(impls: list[str], platform: str) -> list[str]:
    if platform == "gpu":
        return ["pallas:triton", "xla"]
    return [i for i in impls if i.startswith("pallas")][:1] + ["xla"]


def _run_isolated(args, preset, impls, flash_cases, decode_cases):
    """Each impl in its own process (``--isolate off`` there); a timeout or crash becomes error rows."""
    import json
    import subprocess
    import sys
    import tempfile

    from ditto_jax.kernels._config import platform as current_platform

    flash_rows: list[dict[str, Any]] = []
    decode_rows: list[dict[str, Any]] = []
    decode_impls = set(_decode_impls(impls, current_platform())) if not args.no_decode else set()
    with tempfile.TemporaryDirectory() as tmp:
        for impl in impls:
            out_dir = Path(tmp) / str(len(flash_rows))
            cmd = [sys.executable, "-c", "import sys; from ditto_jax.cli import main; sys.exit(main())", "bench",
                   "kernels", "--preset", preset, "--impls", impl, "--modes", args.modes, "--iters",
                   str(args.iters or 20), "--warmup", str(args.warmup), "--out-dir", str(out_dir), "--isolate", "off"]
            if impl not in decode_impls:
                cmd.append("--no-decode")
            error = None
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.impl_timeout)
                if proc.returncode != 0:
                    error = f"child exited {proc.returncode}: {proc.stderr[-1500:]}"
            except subprocess.TimeoutExpired:
                error = f"timeout after {args.impl_timeout:.0f} s (hung or too slow)"
            report = out_dir / "kernels.json"
            if error is None and report.exists():
                child = json.loads(report.read_text())
                flash_rows += child["flash"]
                decode_rows += [r for r in child["decode"] if r["impl"] == impl]
                continue
            flash_rows += [{**dataclasses.asdict(c), "impl": impl, "error": error or "no report"} for c in flash_cases]
            if impl in decode_impls:
                decode_rows += [{**dataclasses.asdict(c), "impl": impl, "error": error or "no report"}
                                for c in decode_cases]
    return flash_rows, decode_rows


def _run_here(args, platform, impls, modes, iters, flash_cases, decode_cases, peak, copy_gbs):
    flash_rows: list[dict[str, Any]] = []
    for case in flash_cases:
        for impl in impls:
            if impl == "cudnn" and platform != "gpu":
                continue
            try:
                row = _flash_entry(case, impl, modes, iters, args.warmup)
                for mode in ("fwd", "bwd"):
                    if f"{mode}_tflops" in row:
                        row[f"{mode}_pct_peak"] = 100.0 * row[f"{mode}_tflops"] / peak
            except Exception as exc:  # noqa: BLE001 - one failing lowering must not end the sweep
                row = {**dataclasses.asdict(case), "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            flash_rows.append(row)

    decode_rows: list[dict[str, Any]] = []
    if not args.no_decode:
        for case in decode_cases:
            for impl in _decode_impls(impls, platform):
                try:
                    row = _decode_entry(case, impl, iters, args.warmup)
                    row["pct_copy_bw"] = 100.0 * row["gbs"] / copy_gbs
                except Exception as exc:  # noqa: BLE001
                    row = {**dataclasses.asdict(case), "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                decode_rows.append(row)
    return flash_rows, decode_rows


def _finish(args, device, preset, peak, peak_source, copy_gbs, iters, flash_rows, decode_rows) -> dict[str, Any]:
    from ditto_jax.fileio import atomic_write_json, atomic_write_text

    pallas_fwd = [r["fwd_tflops"] for r in flash_rows if r["impl"].startswith("pallas") and "fwd_tflops" in r]
    result: dict[str, Any] = {
        "bench": "kernels", "preset": preset, "device": device, "peak_tflops": peak, "peak_source": peak_source,
        "copy_gbs": copy_gbs, "iters": iters, "tflops": max(pallas_fwd) if pallas_fwd else None,
        "errors": sum("error" in r for r in flash_rows + decode_rows), "flash": flash_rows, "decode": decode_rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "kernels.json", result)
    atomic_write_text(out / "kernels.md", _markdown(result))
    try:
        _plot(result, out / "kernels.png")
        result["plot"] = str(out / "kernels.png")
    except Exception as exc:  # noqa: BLE001 - a missing plotting backend must not lose the measurements
        result["plot_error"] = f"{type(exc).__name__}: {exc}"
    return result
