#!/usr/bin/env python3
"""Correctness of the attention kernels on the machine's accelerator, entry by entry.

Each entry (flash forward + backward, decode) runs in its own try block and is reported as ``pass``,
``fail`` (with its relative errors) or ``error`` (with the exception): a lowering that does not compile on
this jax/CUDA never hides the others. Prints one JSON object (also written to ``--out``).

    python scripts/gpu_kernels_check.py                # GPU: Mosaic GPU (Triton / own backward), Triton, auto
    python scripts/gpu_kernels_check.py --small        # CPU: tiny shapes in the Pallas interpreter
    python scripts/gpu_kernels_check.py --backends triton --out check.json

Reference: the XLA implementation in float32 with full-precision matmuls on the same inputs. Tolerances:
2e-2 (relative to the largest reference magnitude) for bf16 inputs, 1e-3 for float32 on a GPU, 1e-5 on CPU.
Exit status 0 unless ``--strict`` and some entry did not pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _importable_without_install() -> None:
    """Let a bare checkout (no ``pip install``) import ``ditto_jax.kernels``, which lives in ``kernels/``."""
    import importlib.util

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("ditto_jax.kernels") is None:
        spec = importlib.util.spec_from_file_location("ditto_jax.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["ditto_jax.kernels"] = module
        spec.loader.exec_module(module)


# name: (batch, sq, sk, hq, hkv, d, dtype, causal, segments)
GPU_FLASH = {
    "causal_gqa4_d128": (2, 1024, 1024, 8, 2, 128, "bfloat16", True, False),
    "noncausal_mha_d128": (2, 1024, 1024, 8, 8, 128, "bfloat16", False, False),
    "prefill_sq_lt_sk_unaligned_gqa8_d64": (1, 1000, 1536, 8, 1, 64, "bfloat16", True, False),
    "sq_gt_sk_empty_rows_d128": (1, 300, 200, 4, 2, 128, "bfloat16", True, False),
    "packed_segments_unaligned_d128": (2, 777, 777, 4, 2, 128, "bfloat16", True, True),
    "float32_causal_d64": (1, 512, 512, 4, 4, 64, "float32", True, False),
}
SMALL_FLASH = {
    "causal_gqa_unaligned": (1, 40, 40, 4, 2, 32, "float32", True, False),
    "segments_sq_lt_sk": (1, 24, 40, 2, 1, 32, "float32", True, True),
}
# name: (batch, cache, hq, hkv, d, dtype, lengths)
GPU_DECODE = {
    "decode_gqa4_d128": (4, 2048, 32, 8, 128, "bfloat16", (1, 1000, 2048, 0)),
    "decode_gqa8_float32": (3, 1024, 8, 1, 64, "float32", (1, 513, 1024)),
}
SMALL_DECODE = {"decode_small": (3, 64, 4, 1, 32, "float32", (1, 30, 64))}


def _tolerance(dtype: str, platform: str) -> float:
    if dtype != "float32":
        return 2e-2
    return 1e-5 if platform == "cpu" else 1e-3


def _rel(a, b) -> float:
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def _segments(b: int, sq: int, sk: int):
    """Three packed segments over the kv positions; queries are the last ``sq`` positions (a pair if Sq != Sk)."""
    import jax.numpy as jnp

    cut1, cut2 = sk // 3, (2 * sk) // 3
    kv = jnp.asarray([[1] * cut1 + [2] * (cut2 - cut1) + [3] * (sk - cut2)] * b, jnp.int32)
    return kv if sq == sk else (kv[:, sk - sq:], kv)


def check_flash(spec: tuple, backend: str, platform: str) -> dict[str, Any]:
    """Forward and dq/dk/dv of one flash-attention shape against the reference."""
    import jax
    import jax.numpy as jnp

    from ditto_jax.kernels import attention_reference, flash_attention
    from ditto_jax.kernels._config import parse_backend_spec

    b, sq, sk, hq, hkv, d, dtype, causal, segmented = spec
    ks = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(ks[0], (b, sq, hq, d), jnp.float32).astype(dt)
    k = jax.random.normal(ks[1], (b, sk, hkv, d), jnp.float32).astype(dt)
    v = jax.random.normal(ks[2], (b, sk, hkv, d), jnp.float32).astype(dt)
    do = jax.random.normal(ks[3], (b, sq, hq, d), jnp.float32).astype(dt)
    seg = _segments(b, sq, sk) if segmented else None

    def run(fn):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    name, blocks = parse_backend_spec(None if backend == "auto" else backend)
    kernel = jax.jit(lambda: run(lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg,
                                                                  backend=name, block_sizes=blocks)))
    with jax.default_matmul_precision("highest"):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]

        def ref_run():
            o, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=seg), *f32[:3])
            return (o, *vjp(f32[3]))

        want = jax.jit(ref_run)()
    t0 = time.perf_counter()
    got = jax.block_until_ready(kernel())
    errors = {name: _rel(a, w) for name, a, w in zip(("o", "dq", "dk", "dv"), got, want)}
    finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in got)
    tol = _tolerance(dtype, platform)
    ok = finite and all(e <= tol for e in errors.values())
    return {"status": "pass" if ok else "fail", "errors": errors, "finite": finite, "tolerance": tol,
            "seconds": round(time.perf_counter() - t0, 3)}


def check_decode(spec: tuple, backend: str, platform: str) -> dict[str, Any]:
    """Decode attention at ragged lengths (1, mid, full, and 0 where listed) against the reference."""
    import jax
    import jax.numpy as jnp

    from ditto_jax.kernels import decode_attention, decode_reference

    b, s, hq, hkv, d, dtype, lengths = spec
    ks = jax.random.split(jax.random.key(1), 3)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(ks[0], (b, hq, d), jnp.float32).astype(dt)
    kc = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dt)
    vc = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dt)
    lens = jnp.asarray(lengths, jnp.int32)
    got = jax.jit(lambda: decode_attention(q, kc, vc, lens, backend=None if backend == "auto" else backend))()
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda: decode_reference(q.astype(jnp.float32), kc.astype(jnp.float32),
                                                vc.astype(jnp.float32), lens))()
    err = _rel(got, want)
    tol = _tolerance(dtype, platform)
    zero_rows_ok = all(bool(jnp.all(got[i] == 0)) for i, n in enumerate(lengths) if n == 0)
    ok = err <= tol and zero_rows_ok and bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
    return {"status": "pass" if ok else "fail", "errors": {"o": err}, "zero_rows_ok": zero_rows_ok, "tolerance": tol}


def _run_child(backend: str, args: argparse.Namespace, flash_specs: dict, decode_specs: dict) -> list[dict]:
    """This script for one backend in a child process; a timeout or crash becomes error entries."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--backends", backend, "--isolate", "off", "--out", str(out)]
        if args.small:
            cmd.append("--small")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            sys.stderr.write(proc.stderr[-4000:])
            if out.exists():
                return json.loads(out.read_text())["entries"]
            error = f"child exited {proc.returncode}: {proc.stderr[-1500:]}"
        except subprocess.TimeoutExpired:
            error = f"timeout after {args.timeout:.0f} s (a kernel hung, or compiling took too long)"
    names = [("flash", n) for n in flash_specs] + [("decode", n) for n in decode_specs]
    print(f"[check] {backend}: {error[:200]}", file=sys.stderr, flush=True)
    return [{"kind": kind, "name": name, "backend": backend, "status": "error", "error": error} for kind, name in names]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every entry; returns (and prints) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes in the interpreter (CPU)")
    parser.add_argument("--backends", default=None, help="comma list (default: mosaic_gpu,triton,auto on GPU)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when an entry does not pass")
    parser.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                        help="one child process per backend with --timeout (auto: on for GPU), so a kernel that "
                             "hangs or kills the process is reported as an error instead of stopping the check")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per isolated backend")
    args = parser.parse_args(argv)
    _importable_without_install()

    import jax

    platform = jax.default_backend()
    if args.backends:
        backends = args.backends.split(",")
    elif args.small or platform == "cpu":
        backends = ["interpret"]
    elif platform == "tpu":
        backends = ["mosaic_tpu", "auto"]
    else:
        backends = ["mosaic_gpu", "mosaic_gpu@mgpu_bwd=1", "triton", "auto"]
    flash_specs = SMALL_FLASH if args.small else GPU_FLASH
    decode_specs = SMALL_DECODE if args.small else GPU_DECODE
    report: dict[str, Any] = {"platform": platform, "device_kind": jax.devices()[0].device_kind,
                              "jax_version": jax.__version__, "backends": backends, "entries": []}
    if platform == "gpu" and "auto" in backends:
        from ditto_jax.kernels.flash_attention import mosaic_gpu_self_check

        report["mosaic_gpu_self_check"] = {f"d{d}": mosaic_gpu_self_check(d, "bfloat16") or "pass" for d in (64, 128)}

    isolate = args.isolate == "on" or (args.isolate == "auto" and platform == "gpu" and len(backends) > 1)
    if isolate:
        for backend in backends:
            report["entries"] += _run_child(backend, args, flash_specs, decode_specs)
        backends = []
    for backend in backends:
        for name, spec in flash_specs.items():
            entry: dict[str, Any] = {"kind": "flash", "name": name, "backend": backend}
            try:
                entry.update(check_flash(spec, backend, platform))
            except Exception as exc:  # noqa: BLE001 - report and go on
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1500],
                             trace=traceback.format_exc()[-1500:])
            report["entries"].append(entry)
            print(f"[check] flash {backend:>10} {name:<40} {entry['status']}", file=sys.stderr, flush=True)
        decode_backend = "triton" if backend.startswith("mosaic_gpu") else backend.partition("@")[0]
        if decode_backend in {e["backend"] for e in report["entries"] if e["kind"] == "decode"}:
            continue
        for name, spec in decode_specs.items():
            entry = {"kind": "decode", "name": name, "backend": decode_backend}
            try:
                entry.update(check_decode(spec, decode_backend, platform))
            except Exception as exc:  # noqa: BLE001
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1500],
                             trace=traceback.format_exc()[-1500:])
            report["entries"].append(entry)
            print(f"[check] decode {decode_backend:>9} {name:<40} {entry['status']}", file=sys.stderr, flush=True)

    statuses = [e["status"] for e in report["entries"]]
    report["summary"] = {s: statuses.count(s) for s in ("pass", "fail", "error")}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    result = main()
    strict = "--strict" in sys.argv
    sys.exit(1 if strict and result["summary"]["pass"] != len(result["entries"]) else 0)
