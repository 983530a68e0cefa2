"""``ditto-jax bench kernels``: attention kernels against XLA (and cuDNN on GPU).

Flash attention: time, TFLOP/s (``4·B·H·Sq·Sk·D`` for the forward, halved when causal; the backward counts
2.5x the forward: five matmuls against two; backward time = forward+backward time minus forward time), % of
the device's dense bf16 peak (CPU: a matmul measured in the same run), and speed-ups against the XLA
reference and cuDNN. Decode: GB/s (K and V bytes read up to each row's length, plus q and o) and % of the
device-to-device copy bandwidth measured in the same run. Every entry is measured in its own try block: an
implementation that fails to lower is reported with its error and the sweep goes on.

Writes ``kernels.json``, ``kernels.md`` (tables, and the goals: best Pallas variant per pass at the goal
shape against cuDNN and the kernel goals) and ``kernels.png`` (TFLOP/s against sequence length) to
``--out-dir``; JSON and markdown are rewritten after every entry, so a run cut short keeps what it measured.
``--preset cpu`` runs small shapes with the interpreted kernels (it proves the harness, its figures say
nothing about kernel speed); ``--preset gpu`` the goal shapes plus a sequence-length sweep, ``gpu-goal`` the
goal shapes only, ``gpu-sweep`` the sweep only.

Tiling sweep: ``--impls`` and ``--decode-impls`` take specs such as ``pallas:triton@block_q=128;num_warps=8``
and ``pallas:triton@block_kv=64;num_splits=8`` (fields of ``BlockSizes`` / ``DecodeBlockSizes``), or ``tune``
for the prepared variant lists (``ditto_jax.bench.kernel_tuning``); ``--budget`` stops starting entries when
the time is spent (the rest are reported as skipped) and ``--confirm-best`` then measures the best forward
tiles combined with the best backward tiles. ``--isolate restart --entry-timeout S`` bounds what a hung
kernel costs: an entry past ``S`` seconds is a timeout row and a fresh process resumes after it;
``--skip-flash triton:noncausal`` leaves out one lowering at one mask (e.g. where its correctness check hung).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from ditto_jax.bench import kernel_tuning

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


PRESETS = ("cpu", "cpu-tiny", "gpu", "gpu-goal", "gpu-sweep", "tpu")
GOAL_FLASH = [FlashCase(2, 8192, 16, 16, 128, c, "bfloat16") for c in (True, False)]
GOAL_DECODE = [DecodeCase(32, 8192, 32, 8, 128, "bfloat16")]
SWEEP_FLASH = [FlashCase(16384 // s, s, 16, 16, 128, True, "bfloat16") for s in (1024, 2048, 4096)]


def _presets(name: str) -> tuple[list[FlashCase], list[DecodeCase]]:
    if name == "cpu":
        flash = [FlashCase(1, s, 2, 1, 64, c, "float32") for s in (128, 256) for c in (True, False)]
        return flash, [DecodeCase(2, 512, 4, 1, 64, "float32")]
    if name == "cpu-tiny":  # the tuning machinery's CPU proof: one tiny shape, both masks
        flash = [FlashCase(1, 64, 2, 1, 32, c, "float32") for c in (True, False)]
        return flash, [DecodeCase(2, 64, 4, 1, 32, "float32")]
    if name in ("gpu", "tpu"):
        return GOAL_FLASH + SWEEP_FLASH, list(GOAL_DECODE)
    if name == "gpu-goal":
        return list(GOAL_FLASH), list(GOAL_DECODE)
    if name == "gpu-sweep":
        return list(SWEEP_FLASH), []
    raise ValueError(f"unknown preset {name!r}")


def _goal_cases(name: str, flash: list[FlashCase],
                decode: list[DecodeCase]) -> tuple[list[FlashCase], list[DecodeCase]]:
    """The cases the goals are judged at: the issue's shapes, or on CPU presets the largest ones run."""
    if name in ("cpu", "cpu-tiny"):
        longest = max((c.seq for c in flash), default=0)
        return [c for c in flash if c.seq == longest], decode[-1:]
    return [c for c in GOAL_FLASH if c in flash], [c for c in GOAL_DECODE if c in decode]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--preset", choices=PRESETS, default=None, help="shape set (default: by platform)")
    parser.add_argument("--impls", default=None,
                        help="comma list of pallas[:backend][@tile=N;...] | xla | cudnn, or 'tune' (the prepared "
                             "GPU tiling variants) | 'tune-small' (default: by platform)")
    parser.add_argument("--decode-impls", default=None,
                        help="decode impls: comma list of pallas[:backend][@block_kv=N;num_splits=N;num_warps=N;"
                             "num_stages=N] | xla, or 'tune' | 'tune-small' (default: by platform)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the sweep: no entry starts after that (the rest are reported as skipped)")
    parser.add_argument("--confirm-best", action="store_true",
                        help="after the sweep, measure the best forward tiles combined with the best backward "
                             "tiles at the goal shapes (when not measured yet and the budget allows)")
    parser.add_argument("--no-flash", action="store_true")
    parser.add_argument("--modes", default="fwd,bwd", help="comma list of fwd, bwd")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per entry (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", default="benchmarks/kernels", help="where kernels.{json,md,png} go")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--isolate", choices=["auto", "on", "off", "restart"], default="auto",
                        help="on: each impl in a child process with --impl-timeout (auto: on for GPU), so a "
                             "kernel that hangs or crashes the process costs only its own rows; restart: the "
                             "entries in one child, each with --entry-timeout: an entry past it is recorded as "
                             "a timeout row, that child ends and a new one goes on after it (what a hang costs: "
                             "one entry's limit and a process start)")
    parser.add_argument("--impl-timeout", type=float, default=240.0, help="seconds per isolated impl")
    parser.add_argument("--entry-timeout", type=float, default=None,
                        help="seconds per entry (one impl at one shape, compile + timing); past it the entry is "
                             "recorded as a timeout row and the process exits with status 3 (used by --isolate "
                             "restart; alone, with --resume, a caller can restart it)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of --out-dir's kernels.json and run only the other entries")
    parser.add_argument("--skip-flash", default="",
                        help="comma list of LOWERING:causal|noncausal (LOWERING: triton, mosaic_gpu, "
                             "mosaic_gpu@mgpu_bwd=1): flash entries of the impls that run that lowering at that "
                             "mask are reported as skipped, not run (e.g. a combination whose check hung)")


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
    backend, blocks = kernel_tuning.parse_flash_impl(impl)
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend, block_sizes=blocks)


def _check_impls(flash_impls: list[str], decode_impls: list[str]) -> None:
    """Parse every spec before anything compiles: a bad name or field fails the run at once, naming it."""
    for impl in flash_impls:
        if impl not in ("xla", "cudnn"):
            if not impl.startswith("pallas"):
                raise ValueError(f"--impls: {impl!r} is not pallas[:backend][@tiles], xla or cudnn")
            kernel_tuning.parse_flash_impl(impl)
    for impl in decode_impls:
        if impl != "xla":
            if not impl.startswith("pallas"):
                raise ValueError(f"--decode-impls: {impl!r} is not pallas[:backend][@tiles] or xla")
            kernel_tuning.parse_decode_impl(impl)


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
        backend, blocks = kernel_tuning.parse_decode_impl(impl)
        fn = lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend, block_sizes=blocks)  # noqa: E731
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
    for r in _sorted_flash(result["flash"]):
        if "error" in r or "skipped" in r:
            why = f"error: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['batch']} | {r['seq']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                         f"{r['causal']} | {r['dtype']} | {r['impl']} | {why} |" + " |" * 9)
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
            if "error" in r or "skipped" in r:
                why = f"error: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
                lines.append(f"| {r['batch']} | {r['cache']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                             f"{r['dtype']} | {r['impl']} | {why} | | | |")
                continue
            lines.append(f"| {r['batch']} | {r['cache']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                         f"{r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.1f} | {r['pct_copy_bw']:.1f} | "
                         f"{fmt(r.get('speedup_vs_xla'))} |")
    if result.get("summary"):
        lines += ["", kernel_tuning.goals_markdown(result["summary"]).rstrip("\n")]
    if result.get("partial"):
        lines += ["", "Partial: the sweep is still running (or was cut short)."]
    return "\n".join(lines) + "\n"


def _sorted_flash(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by shape (first-seen order), impls in measurement order within a shape."""
    def shape(r: dict[str, Any]) -> tuple:
        return tuple(r[f] for f in ("batch", "seq", "heads", "kv_heads", "head_dim", "causal", "dtype"))

    order: dict[tuple, int] = {}
    for r in rows:
        order.setdefault(shape(r), len(order))
    return sorted(rows, key=lambda r: order[shape(r)])


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
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Sweep:
    """The rows measured so far and everything needed to write them (after each entry and at the end)."""

    def __init__(self, args, device, preset, peak, peak_source, copy_gbs, iters, goal_flash, goal_decode):
        self.args, self.device, self.preset, self.iters = args, device, preset, iters
        self.peak, self.peak_source, self.copy_gbs = peak, peak_source, copy_gbs
        self.goal_flash = [dataclasses.asdict(c) for c in goal_flash]
        self.goal_decode = [dataclasses.asdict(c) for c in goal_decode]
        self.flash: list[dict[str, Any]] = []
        self.decode: list[dict[str, Any]] = []
        self.deadline = time.time() + args.budget if args.budget is not None else None
        self.started = time.time()

    def load(self, path: Path) -> None:
        """``--resume``: keep the rows of a previous (cut) run of the same preset."""
        import json

        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if old.get("preset") == self.preset:
            self.flash, self.decode = list(old.get("flash", [])), list(old.get("decode", []))

    def has(self, kind: str, case: Any, impl: str) -> bool:
        """Whether an entry (one impl at one shape) already has a row."""
        want = {**dataclasses.asdict(case), "impl": impl}
        return any(all(row.get(k) == v for k, v in want.items()) for row in (self.flash if kind == "flash"
                                                                              else self.decode))

    def time_left(self) -> float:
        """Seconds before the budget is spent (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def add_flash(self, row: dict[str, Any]) -> None:
        """Record a flash row (with % of peak) and rewrite the partial report."""
        for mode in ("fwd", "bwd"):
            if f"{mode}_tflops" in row:
                row[f"{mode}_pct_peak"] = 100.0 * row[f"{mode}_tflops"] / self.peak
        self.flash.append(row)
        self.write(final=False)

    def add_decode(self, row: dict[str, Any]) -> None:
        """Record a decode row (with % of the copy bandwidth) and rewrite the partial report."""
        if "gbs" in row:
            row["pct_copy_bw"] = 100.0 * row["gbs"] / self.copy_gbs
        self.decode.append(row)
        self.write(final=False)

    def result(self, final: bool) -> dict[str, Any]:
        """The report as it stands."""
        keys = ("batch", "seq", "heads", "kv_heads", "head_dim", "causal", "dtype")
        for mode in ("fwd", "bwd"):
            _add_ratios(self.flash, keys, f"{mode}_ms", f"{mode}_speedup_vs_xla", "xla")
            _add_ratios(self.flash, keys, f"{mode}_ms", f"{mode}_speedup_vs_cudnn", "cudnn")
        _add_ratios(self.decode, ("batch", "cache", "heads", "kv_heads", "head_dim", "dtype"), "ms",
                    "speedup_vs_xla", "xla")
        rows = self.flash + self.decode
        pallas_fwd = [r["fwd_tflops"] for r in self.flash if r["impl"].startswith("pallas") and "fwd_tflops" in r]
        return {
            "bench": "kernels", "preset": self.preset, "device": self.device, "peak_tflops": self.peak,
            "peak_source": self.peak_source, "copy_gbs": self.copy_gbs, "iters": self.iters,
            "tflops": max(pallas_fwd) if pallas_fwd else None, "partial": not final,
            "errors": sum("error" in r for r in rows), "skipped": sum("skipped" in r for r in rows),
            "budget_s": self.args.budget, "seconds": round(time.time() - self.started, 1),
            "summary": kernel_tuning.summarize(self.flash, self.decode, self.goal_flash, self.goal_decode,
                                               self.copy_gbs) if self.goal_flash or self.goal_decode else None,
            "flash": self.flash, "decode": self.decode,
        }

    def write(self, final: bool) -> dict[str, Any]:
        """Write ``kernels.json`` and ``kernels.md`` (and at the end the plot); returns the result."""
        from ditto_jax.fileio import atomic_write_json, atomic_write_text

        result = self.result(final)
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "kernels.json", result)
        atomic_write_text(out / "kernels.md", _markdown(result))
        if final:
            try:
                _plot(result, out / "kernels.png")
                result["plot"] = str(out / "kernels.png")
            except Exception as exc:  # noqa: BLE001 - a missing plotting backend must not lose the measurements
                result["plot_error"] = f"{type(exc).__name__}: {exc}"
        return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep, write JSON/markdown/PNG to ``--out-dir`` and return the result."""
    device = _device_info()
    platform = device["platform"]
    preset = args.preset or ("gpu" if platform == "gpu" else "tpu" if platform == "tpu" else "cpu")
    flash_cases, decode_cases = _presets(preset)
    goal_flash, goal_decode = _goal_cases(preset, flash_cases, decode_cases)
    impls = kernel_tuning.expand(args.impls, kernel_tuning.NAMED_FLASH) if args.impls else _default_impls(platform)
    decode_impls = (kernel_tuning.expand(args.decode_impls, kernel_tuning.NAMED_DECODE) if args.decode_impls
                    else _decode_impls(impls, platform))
    if args.no_flash:
        flash_cases, goal_flash = [], []
    if args.no_decode:
        decode_cases, goal_decode = [], []
    _check_impls(impls if flash_cases else [], decode_impls if decode_cases else [])
    parse_skip_flash(args.skip_flash)
    if args.isolate == "restart":
        return _run_restarting(args)
    modes = [m for m in args.modes.split(",") if m]
    iters = args.iters or (20 if platform in ("gpu", "tpu") else 3)
    copy_gbs = _measure_copy_gbs(platform, max(iters, 5))
    peak = device["peak_tflops"]
    peak_source = "table"
    if peak is None:
        peak, peak_source = _measure_matmul_tflops(max(iters, 5)), "measured float32 1024^3 matmul"
    sweep = _Sweep(args, device, preset, peak, peak_source, copy_gbs, iters, goal_flash, goal_decode)
    if args.resume:
        sweep.load(Path(args.out_dir) / "kernels.json")

    isolate = args.isolate == "on" or (args.isolate == "auto" and platform == "gpu" and len(impls) > 1)
    if isolate:
        _run_isolated(args, sweep, preset, impls, decode_impls, flash_cases, decode_cases)
    else:
        _run_here(args, sweep, platform, impls, decode_impls, modes, iters, flash_cases, decode_cases)
    if args.confirm_best and flash_cases and not isolate:
        _confirm_best(args, sweep, modes, iters, goal_flash)
    return sweep.write(final=True)


def _decode_impls(impls: list[str], platform: str) -> list[str]:
    if platform == "gpu":
        return ["pallas:triton", "xla"]
    return [i for i in impls if i.startswith("pallas")][:1] + ["xla"]


def _skipped(case, impl: str) -> dict[str, Any]:
    return {**dataclasses.asdict(case), "impl": impl, "skipped": "run budget spent"}


def _run_isolated(args, sweep: _Sweep, preset, impls, decode_impls, flash_cases, decode_cases) -> None:
    """Each flash impl in its own process (``--isolate off`` there), the decode impls in one more; a timeout
    or crash becomes error rows."""
    import json
    import subprocess
    import sys
    import tempfile

    jobs = [([impl], None) for impl in impls if flash_cases] + ([(None, decode_impls)] if decode_cases else [])
    with tempfile.TemporaryDirectory() as tmp:
        for n, (flash_impls, dec_impls) in enumerate(jobs):
            cases = flash_cases if flash_impls else decode_cases
            names = flash_impls or dec_impls
            limit = min(args.impl_timeout, sweep.time_left())
            if limit <= 0:
                for impl in names:
                    for case in cases:
                        (sweep.add_flash if flash_impls else sweep.add_decode)(_skipped(case, impl))
                continue
            out_dir = Path(tmp) / str(n)
            cmd = [sys.executable, "-c", "import sys; from ditto_jax.cli import main; sys.exit(main())", "bench",
                   "kernels", "--preset", preset, "--modes", args.modes, "--iters", str(args.iters or 20),
                   "--warmup", str(args.warmup), "--out-dir", str(out_dir), "--isolate", "off"]
            cmd += ["--skip-flash", args.skip_flash] if args.skip_flash else []
            cmd += ["--impls", flash_impls[0], "--no-decode"] if flash_impls else [
                "--decode-impls", ",".join(dec_impls), "--no-flash"]
            error = None
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
                if proc.returncode != 0:
                    error = f"child exited {proc.returncode}: {proc.stderr[-1500:]}"
            except subprocess.TimeoutExpired:
                error = f"timeout after {limit:.0f} s (hung or too slow)"
            report = out_dir / "kernels.json"
            if error is None and report.exists():
                child = json.loads(report.read_text())
                for row in child["flash"]:
                    sweep.add_flash(row)
                for row in child["decode"]:
                    sweep.add_decode(row)
                continue
            for impl in names:
                for case in cases:
                    row = {**dataclasses.asdict(case), "impl": impl, "error": error or "no report"}
                    (sweep.add_flash if flash_impls else sweep.add_decode)(row)


def parse_skip_flash(text: str) -> list[tuple[str, bool]]:
    """``--skip-flash``: ``LOWERING:causal|noncausal,...`` -> ``[(lowering, causal), ...]`` (bad items named)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        lowering, _, mask = item.rpartition(":")
        if lowering not in kernel_tuning.LOWERINGS or mask not in ("causal", "noncausal"):
            raise ValueError(f"--skip-flash: {item!r} is not LOWERING:causal|noncausal with LOWERING one of "
                             f"{list(kernel_tuning.LOWERINGS)}")
        out.append((lowering, mask == "causal"))
    return out


def _skip_reason(impl: str, causal: bool, skips: list[tuple[str, bool]]) -> str | None:
    hit = [lowering for lowering, c in skips if c == causal and kernel_tuning.runs_lowering(impl, {lowering})]
    if not hit:
        return None
    return f"--skip-flash: runs {hit[0]} {'causal' if causal else 'non-causal'} (its correctness check hung)"


def _run_here(args, sweep: _Sweep, platform, impls, decode_impls, modes, iters, flash_cases, decode_cases) -> None:
    """Decode first (cheap), then flash impl by impl over the shapes, so a budget cut keeps whole variants.
    Entries already in the report (``--resume``) are not run again."""
    skips = parse_skip_flash(args.skip_flash)
    for impl in decode_impls:
        for case in decode_cases:
            if sweep.has("decode", case, impl):
                continue
            if sweep.time_left() <= 0:
                sweep.add_decode(_skipped(case, impl))
                continue
            sweep.add_decode(_entry_row(_decode_entry, case, impl, iters, args.warmup, sweep=sweep,
                                        add=sweep.add_decode))
    for impl in impls:
        if impl == "cudnn" and platform != "gpu":
            continue
        for case in flash_cases:
            if sweep.has("flash", case, impl):
                continue
            if reason := _skip_reason(impl, case.causal, skips):
                sweep.add_flash({**dataclasses.asdict(case), "impl": impl, "skipped": reason})
                continue
            if sweep.time_left() <= 0:
                sweep.add_flash(_skipped(case, impl))
                continue
            sweep.add_flash(_entry_row(_flash_entry, case, impl, modes, iters, args.warmup, sweep=sweep,
                                       add=sweep.add_flash))


def _entry_row(entry: Callable[..., dict[str, Any]], case: Any, impl: str, *args: Any,
               sweep: "_Sweep | None" = None, add: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``entry(case, impl, *args)``, or an error row when it fails, with what it cost the run in seconds.

    With ``--entry-timeout`` (``sweep.args.entry_timeout``), a watchdog records an entry past that limit as a
    ``timeout`` error row (through ``add``: the report is rewritten) and ends the process with status 3: a
    hung kernel blocks the device, only a fresh process (``--isolate restart``) goes on after it.
    """
    import os
    import threading

    limit = getattr(sweep.args, "entry_timeout", None) if sweep is not None else None
    timer = None
    if limit and add is not None:
        def hung() -> None:
            add({**dataclasses.asdict(case), "impl": impl, "timeout": True,
                 "error": f"timeout after {limit:.0f} s (hung, or compiling took too long)"})
            print(f"[bench kernels] {impl} {dataclasses.asdict(case)}: TIMEOUT after {limit:.0f} s", flush=True)
            os._exit(3)

        timer = threading.Timer(limit, hung)
        timer.daemon = True
        timer.start()
    t0 = time.perf_counter()
    try:
        row = entry(case, impl, *args)
    except Exception as exc:  # noqa: BLE001 - one failing lowering must not end the sweep
        row = {**dataclasses.asdict(case), "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        if timer is not None:
            timer.cancel()
    row["seconds"] = round(time.perf_counter() - t0, 2)  # compile + timing
    return row


def _run_restarting(args: argparse.Namespace) -> dict[str, Any]:
    """``--isolate restart``: run the sweep in a child (``--isolate off --resume --entry-timeout``) until it
    ends other than by a hung entry (status 3), each child with the budget that is left; the last report."""
    import json
    import subprocess
    import sys

    out = Path(args.out_dir)
    (out / "kernels.json").unlink(missing_ok=True)
    started = time.time()
    limit = args.entry_timeout or args.impl_timeout
    cmd = [sys.executable, "-c", "import sys; from ditto_jax.cli import main; sys.exit(main())", "bench", "kernels",
           "--modes", args.modes, "--warmup", str(args.warmup), "--out-dir", str(out), "--isolate", "off",
           "--resume", "--entry-timeout", str(limit), "--impl-timeout", str(args.impl_timeout)]
    for flag in ("preset", "impls", "decode_impls", "iters", "skip_flash"):
        if getattr(args, flag, None):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += [f"--{flag.replace('_', '-')}" for flag in ("confirm_best", "no_flash", "no_decode") if getattr(args, flag)]
    restarts = 0
    while True:
        extra: list[str] = []
        timeout = None
        if args.budget is not None:
            left = args.budget - (time.time() - started)
            extra = ["--budget", f"{max(left, 0.0):.1f}"]
            timeout = max(left, 0.0) + limit + 60.0  # the entry in progress at the budget's end, start, write
        try:
            proc = subprocess.run(cmd + extra, check=False, timeout=timeout, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            break
        if proc.returncode != 3:
            break
        restarts += 1
    path = out / "kernels.json"
    if not path.exists():
        raise RuntimeError(f"bench kernels --isolate restart: the child wrote no {path}")
    result = json.loads(path.read_text())
    result["restarts"] = restarts
    return result


def _confirm_best(args, sweep: _Sweep, modes: list[str], iters: int, goal_flash: list[FlashCase]) -> None:
    """Measure the best-forward + best-backward combination at the goal shapes when it is new."""
    summary = sweep.result(final=False)["summary"]
    spec = summary.get("combined")
    if not spec or summary.get("combined_measured") or "bwd" not in modes:
        return
    measured = {r["impl"] for r in sweep.flash}
    if spec in measured:
        return
    for case in goal_flash:
        if sweep.time_left() <= 0:
            sweep.add_flash(_skipped(case, spec))
            continue
        row = _entry_row(_flash_entry, case, spec, modes, iters, args.warmup, sweep=sweep, add=sweep.add_flash)
        row["combined_from"] = [summary["best_fwd"], summary["best_bwd"]]
        sweep.add_flash(row)
