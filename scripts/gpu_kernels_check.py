#!/usr/bin/env python3
"""Correctness of the attention kernels on the machine's accelerator, entry by entry.

Each entry (flash forward + backward, decode) runs in its own try block and is reported as ``pass``,
``fail`` (with its relative errors), ``error`` (with the exception), ``timeout`` or ``n/a`` (a Mosaic GPU case
with a dtype or head dim those kernels do not take): a lowering that does not compile on this jax/CUDA never
hides the others. The entries run in-process, one after the other, each with a time limit (``--case-timeout``);
on a GPU they run in a child process that, when a case passes its limit, records it as ``timeout`` and exits,
and a new child goes on with the next case (a hung kernel blocks the device, so only a fresh process can).
The cases run round-robin over the backends (every lowering's first case, then every second, ...), and a
backend that has used its share of ``--timeout`` (``--timeout`` / backends with cases left) waits until the
others' cases have run: one hung case cannot starve the other lowerings.
The JSON report is rewritten after every entry (``--out``) and printed at the end. ``auto`` entries say which
lowering ``auto`` picked inside the caller's jit (Mosaic GPU only when its self-check passed there).

    python scripts/gpu_kernels_check.py --out c.json   # GPU: Triton, Mosaic GPU (Triton / own backward), auto
    python scripts/gpu_kernels_check.py --small        # CPU: tiny shapes in the Pallas interpreter
    python scripts/gpu_kernels_check.py --backends triton --out check.json

Reference: the XLA implementation in float32 with full-precision matmuls on the same inputs. Tolerances:
2e-2 (relative to the largest reference magnitude) for bf16 inputs, 1e-3 for float32 on a GPU, 1e-5 on CPU.
Exit status 0 unless ``--strict`` and some entry did not pass (``n/a`` counts as passed).
"""

from __future__ import annotations

import argparse
import json
import os
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
AUTO_FLASH = ("causal_gqa4_d128", "packed_segments_unaligned_d128")  # auto's picks repeat an explicit lowering
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


def flash_programs(causal: bool, backend: str):
    """``(kernel_run, ref_run)``: ``(q, k, v, do, seg) -> (o, dq, dk, dv)`` of the kernel and of the reference.

    The arrays are arguments of the jitted functions, never closed over: a closed-over array is a constant of
    the program, and XLA constant-folds the reference's float32 matmuls at compile time (on the host, 13-18 s
    per dot at the GPU shapes). That, not the kernel, is what passed the 75 s case limit of the non-causal
    Triton case on the 2026-12-04 H200 lease (its slow_operation_alarm lines name ``jit(ref_run)``).
    """
    import jax

    from ditto_jax.kernels import attention_reference, flash_attention
    from ditto_jax.kernels._config import parse_backend_spec

    name, blocks = parse_backend_spec(None if backend == "auto" else backend)

    def kernel_run(q, k, v, do, seg):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, backend=name,
                                                         block_sizes=blocks), q, k, v)
        return (o, *vjp(do))

    def ref_run(q, k, v, do, seg):
        o, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=seg), q, k, v)
        return (o, *vjp(do))

    return kernel_run, ref_run


def check_flash(spec: tuple, backend: str, platform: str) -> dict[str, Any]:
    """Forward and dq/dk/dv of one flash-attention shape against the reference."""
    import jax
    import jax.numpy as jnp

    b, sq, sk, hq, hkv, d, dtype, causal, segmented = spec
    ks = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(ks[0], (b, sq, hq, d), jnp.float32).astype(dt)
    k = jax.random.normal(ks[1], (b, sk, hkv, d), jnp.float32).astype(dt)
    v = jax.random.normal(ks[2], (b, sk, hkv, d), jnp.float32).astype(dt)
    do = jax.random.normal(ks[3], (b, sq, hq, d), jnp.float32).astype(dt)
    seg = _segments(b, sq, sk) if segmented else None

    kernel_run, ref_run = flash_programs(causal, backend)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(ref_run)(*(x.astype(jnp.float32) for x in (q, k, v, do)), seg)
    t0 = time.perf_counter()
    got = jax.block_until_ready(jax.jit(kernel_run)(q, k, v, do, seg))
    errors = {name: _rel(a, w) for name, a, w in zip(("o", "dq", "dk", "dv"), got, want)}
    finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in got)
    tol = _tolerance(dtype, platform)
    ok = finite and all(e <= tol for e in errors.values())
    return {"status": "pass" if ok else "fail", "causal": causal, "errors": errors, "finite": finite,
            "tolerance": tol, "seconds": round(time.perf_counter() - t0, 3)}


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
    got = jax.jit(lambda *a: decode_attention(*a, backend=None if backend == "auto" else backend))(q, kc, vc, lens)
    with jax.default_matmul_precision("highest"):  # arguments, not constants (see check_flash)
        want = jax.jit(decode_reference)(*(x.astype(jnp.float32) for x in (q, kc, vc)), lens)
    err = _rel(got, want)
    tol = _tolerance(dtype, platform)
    zero_rows_ok = all(bool(jnp.all(got[i] == 0)) for i, n in enumerate(lengths) if n == 0)
    ok = err <= tol and zero_rows_ok and bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
    return {"status": "pass" if ok else "fail", "errors": {"o": err}, "zero_rows_ok": zero_rows_ok, "tolerance": tol}


def _cases(backends: list[str], flash_specs: dict, decode_specs: dict, platform: str) -> list[tuple]:
    """``(kind, name, backend, spec)`` in run order, round-robin over the backends: each backend's first case,
    then each one's second, ... so every lowering is reached early, whatever hangs. A backend's own list is
    its flash shapes, then its decode lowering's cases (each decode lowering once).

    Mosaic GPU cases take bf16/fp16 with head dim % 64 == 0 only (other shapes are reported as ``n/a``);
    ``auto`` runs two shapes (its lowering is one of the explicit ones), recording which lowering it picked.
    """
    per_backend: list[list[tuple]] = []
    decoded: set[str] = set()
    for backend in backends:
        specs = flash_specs
        if backend == "auto" and platform == "gpu":
            specs = {n: s for n, s in flash_specs.items() if n in AUTO_FLASH} or flash_specs
        own = [("flash", name, backend, spec) for name, spec in specs.items()]
        decode_backend = "triton" if backend.startswith("mosaic_gpu") else backend.partition("@")[0]
        if decode_backend not in decoded:
            decoded.add(decode_backend)
            own += [("decode", name, decode_backend, spec) for name, spec in decode_specs.items()]
        per_backend.append(own)
    return [lst[i] for i in range(max(map(len, per_backend), default=0)) for lst in per_backend if i < len(lst)]


def _share_spent(backend: str, entries: list[dict[str, Any]], backends: set[str], total: float,
                 case_timeout: float) -> bool:
    """Whether ``backend`` has used its share (``total`` / number of backends) of the whole check's time while
    other backends still have cases to run: the time of its entries (``wall_s``; a timed-out case counts its
    ``case_timeout``). One hung case then costs its own lowering's later cases, not every other lowering's."""
    spent = sum(e.get("wall_s", case_timeout if e.get("status") == "timeout" else 0.0)
                for e in entries if e.get("backend") == backend)
    return len(backends) > 1 and spent >= total / len(backends)


def _mosaic_applicable(backend: str, spec: tuple) -> bool:
    dtype, d = spec[6], spec[5]
    return not backend.startswith("mosaic_gpu") or (dtype in ("bfloat16", "float16") and d % 64 == 0)


def _run_case(kind: str, name: str, backend: str, spec: tuple, platform: str) -> dict[str, Any]:
    """One entry, exceptions reported as ``error`` (with warnings seen, e.g. a self-check fallback)."""
    import warnings

    entry: dict[str, Any] = {"kind": kind, "name": name, "backend": backend}
    if kind == "flash" and not _mosaic_applicable(backend, spec):
        entry.update(status="n/a", why="Mosaic GPU kernels take bf16/fp16 with head dim % 64 == 0")
        return entry
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            entry.update(check_flash(spec, backend, platform) if kind == "flash" else
                         check_decode(spec, backend, platform))
        except Exception as exc:  # noqa: BLE001 - report and go on
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1500],
                         trace=traceback.format_exc()[-1500:])
    entry["wall_s"] = round(time.perf_counter() - t0, 2)
    if seen:
        entry["warnings"] = [str(w.message)[:500] for w in seen][:5]
    if kind == "flash" and backend == "auto" and platform == "gpu":
        entry["auto_lowering"] = _auto_lowering(spec, entry.get("warnings", []))
    return entry


def _auto_lowering(spec: tuple, warned: list[str]) -> str:
    """Which lowering ``auto`` used for this shape (Mosaic GPU only when its self-check passed)."""
    import jax.numpy as jnp

    from ditto_jax.kernels._config import resolve_backend
    from ditto_jax.kernels.flash_attention import _mosaic_gpu_ok, mosaic_gpu_self_check

    d, dtype = spec[5], spec[6]
    probe = jnp.zeros((1, 1, 1, d), dtype)
    backend = resolve_backend(None, mosaic_gpu_ok=_mosaic_gpu_ok(probe, probe))
    if backend == "mosaic_gpu":
        reason = mosaic_gpu_self_check(d, jnp.dtype(dtype).name)  # cached: the value the kernel call saw
        if reason is not None or any("self-check failed" in w for w in warned):
            return f"triton (Mosaic GPU self-check failed: {reason})"
    return backend


class _Report:
    """The report as it grows: rewritten (atomically) after every entry, so a cut run keeps what finished."""

    def __init__(self, path: Path | None, head: dict[str, Any]):
        self.path, self.data = path, head
        if path is not None and path.exists():  # resuming after a case hung (see --isolate restart)
            try:
                old = json.loads(path.read_text())
                if old.get("backends") == head["backends"]:
                    self.data = old
            except (OSError, json.JSONDecodeError):
                pass
        self.data.setdefault("entries", [])

    def done(self) -> set[tuple[str, str, str]]:
        return {(e["kind"], e["name"], e["backend"]) for e in self.data["entries"]}

    def add(self, entry: dict[str, Any]) -> None:
        self.data["entries"].append(entry)
        self.write()

    def write(self) -> None:
        statuses = [e["status"] for e in self.data["entries"]]
        self.data["summary"] = {s: statuses.count(s) for s in ("pass", "fail", "error", "timeout", "n/a")}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            os.replace(tmp, self.path)


def _run_in_process(cases: list[tuple], report: _Report, platform: str, case_timeout: float,
                    total: float | None = None) -> None:
    """Every case not in the report yet, here; a case past ``case_timeout`` is recorded as ``timeout`` and the
    process exits with status 3 at once (a hung kernel blocks the device: only a fresh process goes on).
    With ``total`` (the whole check's seconds), a backend past its share (``_share_spent``) while others have
    cases left has its cases deferred: they run after every other case, in the time that is left."""
    import threading

    def run(kind: str, name: str, backend: str, spec: tuple) -> None:
        print(f"[check] {kind} {backend:>10} {name:<40} ...", file=sys.stderr, flush=True)

        def hung() -> None:
            report.add({"kind": kind, "name": name, "backend": backend, "status": "timeout",
                        **({"causal": spec[7]} if kind == "flash" else {}),
                        "error": f"no result after {case_timeout:.0f} s (hung, or compiling took too long)"})
            print(f"[check] {kind} {backend} {name}: TIMEOUT after {case_timeout:.0f} s", file=sys.stderr, flush=True)
            os._exit(3)

        timer = threading.Timer(case_timeout, hung)
        timer.daemon = True
        timer.start()
        entry = _run_case(kind, name, backend, spec, platform)
        timer.cancel()
        report.add(entry)
        print(f"[check] {kind} {backend:>10} {name:<40} {entry['status']} ({entry.get('wall_s', 0)} s)",
              file=sys.stderr, flush=True)

    deferred = []
    for case in cases:
        kind, name, backend, spec = case
        if (kind, name, backend) in report.done():
            continue
        pending = {b for k, n, b, _ in cases if (k, n, b) not in report.done()}
        if total is not None and _share_spent(backend, report.data["entries"], pending, total, case_timeout):
            print(f"[check] {kind} {backend} {name}: deferred ({backend} used its share of --timeout)",
                  file=sys.stderr, flush=True)
            deferred.append(case)
            continue
        run(*case)
    for case in deferred:
        run(*case)


def _run_restarting(argv: list[str], out: Path, cases: list[tuple], total_timeout: float) -> None:
    """Run this script (``--isolate off``) until every case has an entry: a child that stops on a hung case
    (exit 3, the case recorded as ``timeout``) is started again and goes on after it."""
    import subprocess

    deadline = time.time() + total_timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--isolate", "off", "--out", str(out), "--resume"]
    for _ in range(len(cases) + 1):
        left = deadline - time.time()
        if left <= 5:
            break
        try:
            proc = subprocess.run(cmd, check=False, timeout=left, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            break
        if proc.returncode != 3:
            break


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every entry; returns (and prints) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes in the interpreter (CPU)")
    parser.add_argument("--backends", default=None,
                        help="comma list (default on GPU: triton,mosaic_gpu,mosaic_gpu@mgpu_bwd=1,auto)")
    parser.add_argument("--out", default=None, help="also write the JSON report here (rewritten after every entry)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when an entry does not pass")
    parser.add_argument("--isolate", choices=["auto", "restart", "off"], default="auto",
                        help="restart: the cases run in a child process, in-process one after the other; a case "
                             "past --case-timeout ends that child and a new one goes on after it (auto: restart "
                             "on GPU); off: here (a hung case ends this process after recording it)")
    parser.add_argument("--case-timeout", type=float, default=90.0, help="seconds per case (compile + run)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole check (restart mode)")
    parser.add_argument("--resume", action="store_true", help="keep --out's entries and run only the others")
    parser.add_argument("--no-share-timeout", dest="share_timeout", action="store_false",
                        help="let one backend use all of --timeout (default: a backend past --timeout / number "
                             "of backends with cases left waits until the others' cases have run)")
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
    else:  # Triton first: a Mosaic GPU case that hangs must not hide it
        backends = ["triton", "mosaic_gpu", "mosaic_gpu@mgpu_bwd=1", "auto"]
    flash_specs = SMALL_FLASH if args.small else GPU_FLASH
    decode_specs = SMALL_DECODE if args.small else GPU_DECODE
    cases = _cases(backends, flash_specs, decode_specs, platform)
    out = Path(args.out) if args.out else None
    head = {"platform": platform, "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "backends": backends, "case_timeout_s": args.case_timeout, "entries": []}
    if out is not None and not args.resume:
        out.unlink(missing_ok=True)
    restart = args.isolate == "restart" or (args.isolate == "auto" and platform == "gpu")
    if restart:
        import tempfile

        target = out or Path(tempfile.mkdtemp()) / "check.json"
        child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        child_argv = _drop_options(child_argv, {"--out", "--isolate"}, {"--resume", "--strict"})
        _run_restarting(child_argv, target, cases, args.timeout)
        report = _Report(target, head)
        for kind, name, backend, _ in cases:  # cases never reached (the whole-check limit ran out)
            if (kind, name, backend) not in report.done():
                report.data["entries"].append({"kind": kind, "name": name, "backend": backend,
                                               "status": "timeout", "error": "not reached: --timeout spent"})
        report.path = out
        report.write()
    else:
        report = _Report(out if args.resume else None, head)
        report.path = out
        _run_in_process(cases, report, platform, args.case_timeout,
                        args.timeout if args.share_timeout else None)
        report.write()
    text = json.dumps(report.data, indent=2)
    print(text)
    return report.data


def _drop_options(argv: list[str], with_value: set[str], flags: set[str]) -> list[str]:
    """``argv`` without the named options (``--x v`` and ``--x=v`` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            continue
        if name in with_value:
            skip = "=" not in a
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    result = main()
    strict = "--strict" in sys.argv
    ok = all(e["status"] in ("pass", "n/a") for e in result["entries"])
    sys.exit(1 if strict and not ok else 0)
