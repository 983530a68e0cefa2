"""Few-row float32 matmul on CPU (decoding): ``x [..., K] @ w`` with ``w`` packed once as ``[N/32, K, 32]``.

XLA's CPU dot reads a ``[K, N]`` weight at 13-18 GB/s when ``x`` has 8-16 rows; decoding is that case (one token
per running row), so most of a CPU decode step is spent there. ``small_matmul`` streams the packed weight tile by
tile at the memory bandwidth (``cpu/small_matmul.cc``, an XLA FFI custom call sharing XLA's intra-op threads):
SmolLM2-135M's 30 layers and head, 8 rows, 2-core AMD EPYC: 19-20 ms instead of 35 ms.

The C++ source is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
for this machine (``-march=native``) into ``$XDG_CACHE_HOME/ditto-jax/kernels`` (``~/.cache`` when unset),
named by a hash of the source, the compiler, the flags, jaxlib's FFI headers and the CPU; a later process loads
it without compiling. Written to a temporary name, then renamed. ``available()`` says whether the kernel can
run; when it cannot (no compiler, a failed build, a non-CPU backend, ``DITTO_CPU_MATMUL=0``), ``reason()`` says
why, a warning is logged once, and callers keep XLA's dot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

TILE = 32
TARGET = "ditto_small_matmul"
SOURCE = Path(__file__).resolve().parent / "cpu" / "small_matmul.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The kernel's C++ source did not compile or load (the message holds the command and the compiler's output)."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ditto-jax/kernels`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ditto-jax" / "kernels"


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def build(directory: Path | None = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, c++, g++, clang++): install one (e.g. g++) or set "
                         "DITTO_CPU_MATMUL=0")
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), " ".join(FLAGS).encode(),
                 jaxlib.__version__.encode(), (Path(include) / "xla" / "ffi" / "api" / "ffi.h").read_bytes(),
                 _cpu_signature().encode()):
        key.update(hashlib.sha256(part).digest())
    directory = directory or cache_dir()
    out = directory / f"small_matmul-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernel once per process; ``None`` when it runs, else the reason it cannot."""
    if os.environ.get("DITTO_CPU_MATMUL", "1") == "0":
        return "switched off (DITTO_CPU_MATMUL=0)"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DittoSmallMatmul), platform="cpu")
    except (BuildError, OSError, AttributeError) as e:
        _log.warning("CPU few-row matmul kernel unavailable, decoding keeps XLA's dot: %s", e)
        return f"{type(e).__name__}: {e}"
    return None


def available() -> bool:
    """Whether ``small_matmul`` can run here (builds and loads the kernel on the first call)."""
    return _load() is None


def reason() -> str | None:
    """Why the kernel cannot run (``None`` when it can)."""
    return _load()


def packable(w: jax.Array) -> bool:
    """A float32 ``[K, N]`` weight with ``N`` a multiple of ``TILE`` (other weights keep XLA's dot)."""
    return w.ndim == 2 and w.shape[1] % TILE == 0 and w.dtype == jnp.float32


def pack(w: jax.Array) -> jax.Array:
    """``[K, N]`` -> ``[N/32, K, 32]``: each 32-column tile contiguous (``packable(w)`` must hold)."""
    if not packable(w):
        raise ValueError(f"pack: want a float32 [K, N] weight with N a multiple of {TILE}, got {w.dtype}{w.shape}")
    k, n = w.shape
    return w.reshape(k, n // TILE, TILE).transpose(1, 0, 2)


def unpack(wp: jax.Array) -> jax.Array:
    """``[N/32, K, 32]`` -> ``[K, N]`` (the inverse of ``pack``)."""
    t, k, tile = wp.shape
    return wp.transpose(1, 0, 2).reshape(k, t * tile)


def small_matmul(x: jax.Array, wp: jax.Array) -> jax.Array:
    """``x [..., K] @ unpack(wp)`` in float32 for a packed weight ``wp [N/32, K, 32]`` (``available()`` must hold).

    Meant for few rows (decoding); any row count is correct, the kernel reads the weight once per 8 rows."""
    t, k, tile = wp.shape
    if tile != TILE or x.shape[-1] != k or wp.dtype != jnp.float32:
        raise ValueError(f"small_matmul: x {x.dtype}{x.shape} against a packed weight {wp.dtype}{wp.shape} "
                         f"(want x [..., K], w float32 [N/{TILE}, K, {TILE}])")
    lead = x.shape[:-1]
    rows = x.reshape(-1, k).astype(jnp.float32)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], t * TILE), jnp.float32))(rows, wp)
    return out.reshape(*lead, t * TILE)
