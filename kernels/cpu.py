"""CPU kernels for decoding (XLA FFI custom calls, compiled from ``cpu/*.cc`` on first use).

- ``small_matmul(x, pack(w))``: ``x [..., K] @ w [K, N]`` in float32 for few rows. XLA's CPU dot reads a weight at
  13-18 GB/s when ``x`` has 8-16 rows, and decoding is that case (one token per running row); the kernel streams
  the weight, packed once as ``[N/32, K, 32]``, at close to the memory bandwidth (SmolLM2-135M's 30 layers and
  head, 8 rows, 2-core AMD EPYC: 19-20 ms instead of 35 ms).
- ``small_matmul(x, wq)`` with ``wq = pack_gguf(kind, blocks)``: the same loop over a weight kept in its GGUF blocks
  (Q4_0, Q4_1, Q8_0: 0.75 or 1.25 bytes a weight instead of 4), decoded in registers to exactly the float32 values
  their dequantisation gives (``q * d`` is exact in float32), so the sums, and the result, equal the float kernel's
  over the dequantised weight bit for bit.
- ``decode_attention(q, k, v, positions, window)``: one new token per row against a heads-first cache (keys
  ``[B, Hkv, D, S]``, values ``[B, Hkv, S, D]``), reading each row's keys and values once and only up to its
  position; with ``new_kv`` it first writes the new keys and values into the caches in place.
- ``chunk_attention(q, k, v, q_offset, layer)``: ``T`` new tokens per row against a ``[B, S, Hkv, D]`` cache (or
  one layer of the stacked ``[L, B, S, Hkv, D]`` cache, read in place) that holds them, causal: the prompt phases'
  attention, each block of queries reading only the keys it can see.
- ``select_tokens(logits, presence, penalty, constraint, temperature, kth, top_p, u)``: the decode step's sampler
  (repetition penalty, constraint mask, greedy, temperature, top-k threshold, exact top-p by pivot rejection, raw
  log-probabilities), the algorithm and the random numbers of ``ditto_jax.sampling.logits.select_tokens``, one
  row per task, instead of ~30 single-threaded XLA passes over ``[B, V]``.

- ``matmul(a, b, trans_a=, trans_b=, layer=)``: ``op(a) @ op(b)`` in float32 through OpenBLAS's ``sgemm`` (the
  ``scipy-openblas32`` wheel's library, set to one thread and split over the kernels' workers), reading a
  transposed operand in place, or with ``layer`` one matrix of a stacked ``[L, ., .]`` b in place: the large
  products of a training step (40M model, 2-core Xeon: XLA's dots 185-265 GFLOP/s, these 275-320) and of the
  prompt phases (their layer scan reads each weight from its stack instead of copying it out).
  ``matmul_available()`` says whether it can run (``DITTO_CPU_BLAS=0`` turns it off), ``matmul_reason()`` why not.

- ``causal_attention(q, k, v, segment_ids)``: causal self-attention over whole packed rows for training (q
  ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]``), differentiable: forward and backward kernels whose products run
  OpenBLAS's ``sgemm`` on 64-row query blocks against the keys they see, the operands read in place; the forward
  keeps each row's log-sum-exp, the backward recomputes the probabilities. Needs ``matmul_available()``.

- ``dequantize_gguf(kind, blocks)``: a host function for loading GGUF files, the float32 values of Q4_0/Q4_1/Q8_0
  blocks exactly as ``gguf``'s NumPy dequantisation gives them, ~10x faster (SmolLM2-135M: 1.09 s -> 0.1 s).

All split their work between the calling thread and the kernels' own worker threads (one fewer than the CPUs,
``DITTO_CPU_KERNEL_THREADS`` overrides), which spin briefly after each job and then sleep; one job runs at a time and a
call that finds the workers busy runs alone on its thread.

The sources are compiled with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) for this machine
(``-march=native``) into ``$XDG_CACHE_HOME/ditto-jax/kernels`` (``~/.cache`` when unset), named by a hash of the
sources, the compiler, the flags, jaxlib's FFI headers and the CPU; a later process loads the library without
compiling. Written to a temporary name, then renamed. ``available()`` says whether the kernels can run; when they
cannot (no compiler, a failed build, a non-CPU backend, ``DITTO_CPU_KERNELS=0``), ``reason()`` says why, a warning
is logged once, and callers keep XLA's ops.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import scipy_openblas32

TILE = 32
MATMUL, ATTENTION, SELECT = "ditto_small_matmul", "ditto_decode_attention", "ditto_select_tokens"
ATTENTION_UPDATE, CHUNK_ATTENTION = "ditto_decode_attention_update", "ditto_chunk_attention"
GEMM, GEMM_LAYER = "ditto_gemm", "ditto_gemm_layer"
CAUSAL, CAUSAL_BWD = "ditto_causal_attention", "ditto_causal_attention_backward"
QUANT_MATMUL = {4: "ditto_small_matmul_q4", 8: "ditto_small_matmul_q8"}
FOLDER = Path(__file__).resolve().parent / "cpu"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The kernels' C++ sources did not compile or load (the message holds the command and the compiler's output)."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ditto-jax/kernels`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ditto-jax" / "kernels"


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def cpu_signature() -> str:
    """What code compiled for this host depends on (``-march=native`` here, XLA's CPU executables too): the CPU's
    model and feature flags (Linux), else the platform's name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def build(directory: Path | None = None) -> Path:
    """Compile the kernels (or find them already compiled) and return the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, c++, g++, clang++): install one (e.g. g++) or set "
                         "DITTO_CPU_KERNELS=0")
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    sources = sorted(FOLDER.glob("*.cc"))
    texts = [p.read_bytes() for p in sorted([*sources, *FOLDER.glob("*.h")])]
    for part in (*texts, cxx.encode(), version.encode(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                 (Path(include) / "xla" / "ffi" / "api" / "ffi.h").read_bytes(), cpu_signature().encode()):
        key.update(hashlib.sha256(part).digest())
    directory = directory or cache_dir()
    out = directory / f"ditto_cpu-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", *map(str, sources), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_lib: ctypes.CDLL | None = None


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernels once per process; ``None`` when they run, else the reason they cannot."""
    global _lib
    if os.environ.get("DITTO_CPU_KERNELS", "1") == "0":
        return "switched off (DITTO_CPU_KERNELS=0)"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        lib.ditto_dequantize_gguf.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.ditto_dequantize_gguf.restype = ctypes.c_int
        lib.ditto_vector_bytes.restype = ctypes.c_int
        for target, symbol in ((MATMUL, lib.DittoSmallMatmul), (ATTENTION, lib.DittoDecodeAttention),
                               (SELECT, lib.DittoSelectTokens), (ATTENTION_UPDATE, lib.DittoDecodeAttentionUpdate),
                               (CHUNK_ATTENTION, lib.DittoChunkAttention), (GEMM, lib.DittoGemm),
                               (GEMM_LAYER, lib.DittoGemmLayer),
                               (CAUSAL, lib.DittoCausalAttention), (CAUSAL_BWD, lib.DittoCausalAttentionBackward),
                               (QUANT_MATMUL[4], lib.DittoSmallMatmulQ4), (QUANT_MATMUL[8], lib.DittoSmallMatmulQ8)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except (BuildError, OSError, AttributeError) as e:
        _log.warning("CPU decode kernels unavailable, decoding keeps XLA's ops: %s", e)
        return f"{type(e).__name__}: {e}"
    _lib = lib
    global _blas_reason
    _blas_reason = _load_openblas(lib)
    return None


DECODE_ENV = "DITTO_CPU_DECODE_KERNELS"  # "1": decoding runs the kernels on any host, "0": never


def decode_reason() -> str | None:
    """Why the decoding kernels (``small_matmul``, ``decode_attention``, ``chunk_attention``, ``select_tokens``) stay
    unused here, ``None`` when decoding runs them. They run on the host's own vectors, 16 floats with AVX-512 and 8
    with AVX2 (``ditto-jax bench cpu-kernels`` on a 2-core AVX2 AMD EPYC: 2-4x XLA's ops); a host with neither (SSE
    only, never measured) decodes with XLA's ops. ``DITTO_CPU_DECODE_KERNELS=1`` uses them anyway, ``=0`` never.
    The training kernels (``matmul``, ``causal_attention``) run on any host."""
    if (why := _load()) is not None:
        return why
    flag = os.environ.get(DECODE_ENV, "")
    if flag == "0":
        return f"switched off ({DECODE_ENV}=0)"
    if flag != "1" and _lib.ditto_vector_bytes() < 32:
        return (f"this CPU has neither AVX2 nor AVX-512: the decoding kernels' vectors are not native here "
                f"({DECODE_ENV}=1 uses them anyway)")
    return None


def decode_usable_on(devices: Any) -> bool:
    """``usable_on(devices)`` and ``decode_reason() is None``: whether decoding on ``devices`` runs the kernels."""
    return usable_on(devices) and decode_reason() is None


def available() -> bool:
    """Whether the kernels can run here (builds and loads them on the first call)."""
    return _load() is None


_blas: ctypes.CDLL | None = None
_blas_reason: str | None = "not loaded"


def _load_openblas(lib: ctypes.CDLL) -> str | None:
    """Hand OpenBLAS's ``sgemm`` to the kernels (the library set to one thread: the kernels' workers split the
    products); ``None`` when it runs, else the reason it cannot. Part of ``_load``, so that an executable holding
    the ``matmul`` custom call (a saved one too) finds it set in any process that loaded the kernels."""
    global _blas
    if os.environ.get("DITTO_CPU_BLAS", "1") == "0":
        return "switched off (DITTO_CPU_BLAS=0)"
    try:
        blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
        blas.scipy_openblas_set_num_threads(1)
        lib.ditto_set_sgemm.argtypes = [ctypes.c_void_p]
        lib.ditto_set_sgemm(ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p))
    except (OSError, AttributeError, IndexError) as e:
        _log.warning("OpenBLAS (scipy-openblas32) unavailable, large CPU products keep XLA's dots: %s", e)
        return f"{type(e).__name__}: {e}"
    _blas = blas
    return None


def matmul_reason() -> str | None:
    """Why ``matmul`` cannot run (``None`` when it can: the kernels and OpenBLAS load)."""
    return _load() or _blas_reason


def matmul_available() -> bool:
    """Whether ``matmul`` can run here (the kernels and OpenBLAS load)."""
    return matmul_reason() is None


def matmul_serves(cpu_kernel: bool, *operands: jax.Array) -> bool:
    """Whether ``matmul`` (and ``causal_attention``) take these operands from a caller that vouches for one CPU
    device (``cpu_kernel``): all float32 and ``matmul_available()``; otherwise the caller keeps XLA's ops."""
    return cpu_kernel and all(x.dtype == jnp.float32 for x in operands) and matmul_available()


def matmul(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
           layer: jax.Array | int | None = None) -> jax.Array:
    """``op(a) @ op(b)`` for float32 matrices, ``op`` the transpose where asked (``a`` is ``[K, M]`` with
    ``trans_a``, ``b`` is ``[N, K]`` with ``trans_b``), through OpenBLAS's ``sgemm`` on the kernels' threads
    (``matmul_available()`` must hold). ``layer`` (a scalar, traced or not): ``b`` is a stack ``[L, ., .]`` and the
    product takes its matrix ``layer``, read in place (no slice is copied). Returns ``[M, N]`` float32."""
    stacked = layer is not None
    if (a.ndim != 2 or b.ndim != 2 + stacked or a.dtype != jnp.float32 or b.dtype != jnp.float32
            or (stacked and jnp.ndim(layer) != 0)):
        want = "a float32 matrix and a float32 stack [L, ., .] with a scalar layer" if stacked else "two float32 matrices"
        raise ValueError(f"matmul: want {want}, got {a.dtype}{a.shape} and {b.dtype}{b.shape}")
    bm = b.shape[1:] if stacked else b.shape
    (m, k), (kb, n) = (a.shape[::-1] if trans_a else a.shape), (bm[::-1] if trans_b else bm)
    if k != kb:
        raise ValueError(f"matmul: op(a) {(m, k)} and op(b) {(kb, n)} do not multiply "
                         f"(trans_a={trans_a}, trans_b={trans_b})")
    if (why := matmul_reason()) is not None:
        raise RuntimeError(f"the CPU matmul cannot run here: {why}")
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    if stacked:
        return jax.ffi.ffi_call(GEMM_LAYER, out)(a, b, jnp.asarray(layer, jnp.int32), trans_a=trans_a, trans_b=trans_b)
    return jax.ffi.ffi_call(GEMM, out)(a, b, trans_a=trans_a, trans_b=trans_b)


def matmul_rows(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
                layer: jax.Array | int | None = None) -> jax.Array:
    """``matmul`` over ``a``'s leading axes as rows: without ``trans_a``, ``a [..., K] @ op(b)`` -> ``[..., N]``;
    with it, ``a [..., M]`` and ``b [..., N]`` (the same leading axes) contract over those axes -> ``[M, N]`` (a
    weight gradient). ``layer``: ``b`` is a stack of matrices, as in ``matmul``."""
    if trans_a and layer is not None:
        raise ValueError("matmul_rows: a stacked b (layer) is read as a matrix, not contracted over leading axes")
    out = matmul(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]) if trans_a else b, trans_a=trans_a,
                 trans_b=trans_b, layer=layer)
    return out if trans_a else out.reshape(*a.shape[:-1], out.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     sm_scale: float | None = None) -> jax.Array:
    """Causal self-attention over whole rows, q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` float32, segment ids
    ``[B, S]`` int32 (query ``i`` sees key ``j <= i`` of its own segment, as ``reference.attention_mask`` says) ->
    ``[B, S, Hq, D]`` float32; differentiable in q, k and v (``matmul_available()`` must hold)."""
    return _causal_fwd(q, k, v, segment_ids, sm_scale)[0]


def _causal_check(q, k, v, segment_ids):
    b, s, hq, d = q.shape
    if (k.shape != v.shape or k.ndim != 4 or k.shape[:2] != (b, s) or k.shape[3] != d or hq % k.shape[2]
            or segment_ids.shape != (b, s) or {q.dtype, k.dtype, v.dtype} != {jnp.dtype(jnp.float32)}):
        raise ValueError(f"causal_attention: q {q.dtype}{q.shape}, k {k.dtype}{k.shape}, v {v.dtype}{v.shape}, "
                         f"segment ids {segment_ids.shape} (want float32 q [B, S, Hq, D], k/v [B, S, Hkv, D] with "
                         f"Hq a multiple of Hkv, segment ids [B, S])")
    if (why := matmul_reason()) is not None:
        raise RuntimeError(f"the CPU causal attention cannot run here: {why}")


def _softmax_scale(q: jax.Array, sm_scale: float | None) -> np.float32:
    return np.float32(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)


def _causal_fwd(q, k, v, segment_ids, sm_scale):
    _causal_check(q, k, v, segment_ids)
    b, s, hq, _ = q.shape
    seg = segment_ids.astype(jnp.int32)
    out, lse = jax.ffi.ffi_call(CAUSAL, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                         jax.ShapeDtypeStruct((b, hq, s), jnp.float32)))(
        q, k, v, seg, scale=_softmax_scale(q, sm_scale))
    return out, (q, k, v, seg, out, lse)


def _causal_bwd(sm_scale, res, g):
    q, k, v, seg, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(CAUSAL_BWD, shapes)(q, k, v, seg, out, lse, g.astype(jnp.float32),
                                                       scale=_softmax_scale(q, sm_scale))
    return dq, dk, dv, None


causal_attention.defvjp(_causal_fwd, _causal_bwd)


def usable_on(devices: Any) -> bool:
    """Whether the kernels can run a computation placed on ``devices`` (an iterable of JAX devices): exactly one,
    a CPU, and ``available()``. Callers that vouch for the kernels (``cpu_kernel=True``) decide by this."""
    devices = list(devices)
    return len(devices) == 1 and devices[0].platform == "cpu" and available()


def reason() -> str | None:
    """Why the kernels cannot run (``None`` when they can)."""
    return _load()


def _require() -> None:
    if (why := _load()) is not None:
        raise RuntimeError(f"the CPU decode kernels cannot run here: {why}")


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A ``[K, N]`` weight kept in GGUF-style blocks of 32 along K, tiled like ``pack``: ``q`` ``[N/32, K, 16]``
    uint8 (4 bits: byte j holds column j in its low nibble, column j + 16 in its high one) or ``[N/32, K, 32]`` int8
    (8 bits); ``d``, ``m`` ``[N/32, K/32, 32]`` float32. Weight ``(k, n)`` is ``q * d + m`` of its block."""

    q: jax.Array
    d: jax.Array
    m: jax.Array
    bits: int = dataclasses.field(metadata={"static": True}, default=4)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)``, the weight's shape."""
        return self.q.shape[1], self.q.shape[0] * TILE


# GGUF block layouts kept for decoding: bytes a block of 32, and where d, m (float16) and the 32 values lie.
GGUF_KINDS = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _gguf_blocks(caller: str, kind: str, blocks: np.ndarray) -> tuple[int, np.ndarray]:
    """The bytes a block of ``kind`` takes and ``blocks`` as contiguous uint8; an unkept ``kind`` is an error."""
    if kind not in GGUF_KINDS:
        raise ValueError(f"{caller}: GGUF type {kind} is not one of {sorted(GGUF_KINDS)}")
    return GGUF_KINDS[kind], np.ascontiguousarray(blocks, dtype=np.uint8)


def pack_gguf(kind: str, blocks: np.ndarray) -> dict[str, np.ndarray | int]:
    """Host arrays of a ``QuantWeight`` from a GGUF tensor's raw blocks ``[N, K/32 * bytes]`` (uint8; row n is
    output n, its blocks run along K, as GGUF stores a ``[N, K]`` matrix): ``{"q", "d", "m", "bits"}``. Q4_0's
    ``d * (q - 8)`` becomes ``q * d + (-8 d)``, exactly the same float32 values. ``N`` must be a multiple of 32."""
    size, blocks = _gguf_blocks("pack_gguf", kind, blocks)
    if blocks.ndim != 2 or blocks.shape[1] % size or blocks.shape[0] % TILE:
        raise ValueError(f"pack_gguf: {kind} blocks {blocks.shape} (want [N, K/32 * {size}] uint8, N a multiple "
                         f"of {TILE})")
    n, kb = blocks.shape[0], blocks.shape[1] // size
    b = blocks.reshape(n, kb, size)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, KB]
    if kind == "Q4_1":
        m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    elif kind == "Q4_0":
        m = d * np.float32(-8)
    else:
        m = np.zeros_like(d)
    tiles = n // TILE

    def tiled(a: np.ndarray) -> np.ndarray:  # [N, ...] -> [N/32, ..., 32]
        return np.ascontiguousarray(np.moveaxis(a.reshape(tiles, TILE, *a.shape[1:]), 1, -1))

    if kind == "Q8_0":
        q = tiled(b[:, :, 2:].reshape(n, kb * 32).view(np.int8))  # [T, K, 32]
        bits = 8
    else:
        raw = b[:, :, size - 16:]  # [N, KB, 16]: byte j = value j (low nibble), j + 16 (high)
        values = np.concatenate([raw & 15, raw >> 4], axis=-1).reshape(n, kb * 32)  # [N, K]
        t = tiled(values)  # [T, K, 32]
        q = t[..., :16] | (t[..., 16:] << 4)
        bits = 4
    return {"q": q, "d": tiled(d), "m": tiled(m), "bits": bits}


def quant_weight(host: dict[str, np.ndarray | int], device: Any = None) -> QuantWeight:
    """``pack_gguf``'s arrays on ``device`` (default: JAX's default device)."""
    put = functools.partial(jax.device_put, device=device)
    return QuantWeight(put(host["q"]), put(host["d"]), put(host["m"]), int(host["bits"]))


def concat_quant(parts: list[QuantWeight]) -> QuantWeight:
    """The ``QuantWeight`` of ``[K, N1 + N2 + ...]``: the parts' columns side by side (same K and bits)."""
    if len({(p.q.shape[1], p.bits) for p in parts}) != 1:
        raise ValueError(f"concat_quant: parts disagree in K or bits: {[(p.shape, p.bits) for p in parts]}")
    return QuantWeight(*(jnp.concatenate([getattr(p, f) for p in parts]) for f in ("q", "d", "m")), parts[0].bits)


def dequantize_gguf(kind: str, blocks: np.ndarray) -> np.ndarray:
    """The float32 values of GGUF blocks (``kind`` one of ``GGUF_KINDS``; ``blocks`` uint8 ``[..., n * bytes]``)
    as ``[..., n * 32]``, exactly what ``gguf.quants.dequantize`` gives, on the kernels' threads (``available()``
    must hold; a host function, no XLA call)."""
    size, blocks = _gguf_blocks("dequantize_gguf", kind, blocks)
    if blocks.ndim == 0 or blocks.shape[-1] % size:
        raise ValueError(f"dequantize_gguf: {kind} blocks {blocks.shape} (want uint8 [..., n * {size}])")
    _require()
    out = np.empty((*blocks.shape[:-1], blocks.shape[-1] // size * TILE), np.float32)
    # a ctypes call releases the GIL: another thread's work goes on meanwhile
    _lib.ditto_dequantize_gguf(list(GGUF_KINDS).index(kind), blocks.ctypes.data, blocks.size // size,
                               out.ctypes.data)
    return out


def dequantize(w: QuantWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight ``w`` holds (host; for checks)."""
    q = np.asarray(w.q)
    if w.bits == 4:
        q = np.concatenate([q & 15, q >> 4], axis=-1)
    tiles, k, _ = q.shape
    d = np.repeat(np.asarray(w.d), TILE, axis=1)[:, :k]
    m = np.repeat(np.asarray(w.m), TILE, axis=1)[:, :k]
    values = q.astype(np.float32) * d + m  # [T, K, 32]
    return values.transpose(1, 0, 2).reshape(k, tiles * TILE)


def is_packed(w: Any) -> bool:
    """Whether ``w`` is a weight ``small_matmul`` takes: packed ``[N/32, K, 32]`` floats or a ``QuantWeight``."""
    return isinstance(w, QuantWeight) or w.ndim == 3


def small_matmul(x: jax.Array, wp: jax.Array | QuantWeight) -> jax.Array:
    """``x [..., K] @ unpack(wp)`` in float32 for a packed weight ``wp [N/32, K, 32]`` or a ``QuantWeight``
    (``available()`` must hold).

    Meant for few rows (decoding); any row count is correct, the kernel reads the weight once per pass of 8 rows
    (AVX-512) or 3 (AVX2), a GGUF block weight from memory once."""
    quant = isinstance(wp, QuantWeight)
    t, k = (wp.q.shape[0], wp.q.shape[1]) if quant else wp.shape[:2]
    if x.shape[-1] != k or (not quant and (wp.shape[2] != TILE or wp.dtype != jnp.float32)):
        raise ValueError(f"small_matmul: x {x.dtype}{x.shape} against a packed weight "
                         f"{'quantised ' + str(wp.shape) if quant else str(wp.dtype) + str(wp.shape)} "
                         f"(want x [..., K], w float32 [N/{TILE}, K, {TILE}] or a QuantWeight [K, N])")
    _require()
    lead = x.shape[:-1]
    rows = x.reshape(-1, k).astype(jnp.float32)
    out_type = jax.ShapeDtypeStruct((rows.shape[0], t * TILE), jnp.float32)
    if quant:
        out = jax.ffi.ffi_call(QUANT_MATMUL[wp.bits], out_type)(rows, wp.q, wp.d, wp.m)
    else:
        out = jax.ffi.ffi_call(MATMUL, out_type)(rows, wp)
    return out.reshape(*lead, t * TILE)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     window: int | None = None, shared: tuple[jax.Array, jax.Array] | None = None,
                     new_kv: tuple[jax.Array, jax.Array] | None = None) -> Any:
    """Attention of one new token per row, q ``[B, Hq, D]`` at ``positions [B]``, against a heads-first cache:
    keys ``[B, Hkv, D, S]``, values ``[B, Hkv, S, D]`` (float32; ``available()`` must hold). Row ``b`` attends to
    cache positions ``max(0, positions[b] + 1 - window) .. positions[b]`` (from 0 without a window) and reads
    nothing else; a row with an empty range gets zeros. Returns ``[B, Hq, D]`` float32.

    ``shared = (lead [B], length [B])`` int32: row ``b``'s first ``length[b]`` positions hold the same keys and
    values as row ``lead[b]``'s (``lead[b] < b``, itself its own lead; e.g. both copied from one prefix-cache row),
    so they are read once for the rows sharing them. The result is bit-identical to ``shared=None``; a wrong
    claim gives wrong results. Ignored with a window.

    ``new_kv = (k_new, v_new)`` (``[B, Hkv, D]`` each): first written into the caches at each row's position (a
    position outside the cache is dropped), in place (the caches are aliased to outputs); returns ``(o, k, v)``
    with the updated caches. The same values as scattering them in with XLA first, without XLA's strided scatter
    of the keys."""
    b, hq, d = q.shape
    hkv, s_len = v.shape[1], v.shape[2]
    if (k.shape != (b, hkv, d, s_len) or v.shape != (b, hkv, s_len, d) or hq % hkv or positions.shape != (b,)
            or not all(a.dtype == jnp.float32 for a in (k, v))
            or (shared is not None and any(jnp.shape(a) != (b,) for a in shared))
            or (new_kv is not None and any(jnp.shape(a) != (b, hkv, d) for a in new_kv))):
        raise ValueError(f"decode_attention: q {q.shape}, k {k.dtype}{k.shape}, v {v.dtype}{v.shape}, positions "
                         f"{positions.shape}, shared {None if shared is None else [jnp.shape(a) for a in shared]}, "
                         f"new_kv {None if new_kv is None else [jnp.shape(a) for a in new_kv]} (want float32 k "
                         "[B, Hkv, D, S], v [B, Hkv, S, D], Hq a multiple of Hkv, [B] rows, new k/v [B, Hkv, D])")
    _require()
    if shared is None:
        shared = (jnp.arange(b, dtype=jnp.int32), jnp.zeros((b,), jnp.int32))
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    args = (qg, k, v, positions.astype(jnp.int32), *(jnp.asarray(a, jnp.int32) for a in shared))
    attrs = dict(window=np.int64(window or 0), scale=np.float32(1.0 / d**0.5))
    o_type = jax.ShapeDtypeStruct(qg.shape, jnp.float32)
    if new_kv is None:
        return jax.ffi.ffi_call(ATTENTION, o_type)(*args, **attrs).reshape(b, hq, d)
    o, k, v = jax.ffi.ffi_call(ATTENTION_UPDATE, (o_type, jax.ShapeDtypeStruct(k.shape, k.dtype),
                                                  jax.ShapeDtypeStruct(v.shape, v.dtype)),
                               input_output_aliases={1: 1, 2: 2})(
        *args, *(jnp.asarray(a, jnp.float32) for a in new_kv), **attrs)
    return o.reshape(b, hq, d), k, v


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
                    layer: jax.Array | int | None = None) -> jax.Array:
    """``T`` new tokens per row, q ``[B, T, Hq, D]`` at positions ``q_offset[b] + t``, against keys and values
    ``[B, S, Hkv, D]`` that already hold them, or with ``layer`` (a scalar) layer ``layer`` of a stacked ``[L, B,
    S, Hkv, D]`` cache, read in place (no slice is copied). Causal: query ``t`` of row ``b`` sees positions
    ``0 .. q_offset[b] + t`` (``q_offset >= 0``); float32 (``available()`` must hold). Returns ``[B, T, Hq, D]``
    float32: ``model.xla_attention.cached_chunk_attention``'s values without a window, up to float rounding."""
    if layer is None:
        k, v, layer = k[None], v[None], 0
    b, t, hq, d = q.shape
    if (k.ndim != 5 or k.shape != v.shape or k.shape[1] != b or k.shape[4] != d or hq % k.shape[3]
            or jnp.shape(q_offset) != (b,) or jnp.ndim(layer) != 0
            or not all(a.dtype == jnp.float32 for a in (k, v))):
        raise ValueError(f"chunk_attention: q {q.shape}, k {k.dtype}{k.shape}, v {v.dtype}{v.shape}, q_offset "
                         f"{jnp.shape(q_offset)}, layer {jnp.shape(layer)} (want float32 k and v [B, S, Hkv, D] or "
                         "[L, B, S, Hkv, D] with a scalar layer, Hq a multiple of Hkv, q_offset [B])")
    _require()
    return jax.ffi.ffi_call(CHUNK_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k, v, jnp.asarray(layer, jnp.int32), jnp.asarray(q_offset, jnp.int32),
        scale=np.float32(1.0 / d**0.5))


def select_tokens(logits: jax.Array, presence: jax.Array | None, penalty: jax.Array,
                  constraint: tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array] | None,
                  temperature: jax.Array, kth: jax.Array, top_p: jax.Array,
                  u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The next token of each row and its log-probability under ``logits`` (``available()`` must hold).

    ``logits [B, V]`` float32, raw. The scores are ``logits`` with the repetition ``penalty [B]`` on the tokens
    ``presence [B, V]`` marks (``None``: none), then ``-inf`` where ``constraint = ((next_state [S, C],
    token_class [NC, V]), cstate [B], ccon [B])`` (``sampling.logits.constraint_mask``'s) allows no transition
    (rows with ``cstate < 0``, or ``None``: unconstrained). Per row: ``temperature`` (``<= 0``: the first index
    of the largest score), ``kth`` (keep ``scores / temperature >= kth``; ``-inf``: all), ``top_p``; ``u [B, R]``
    uniforms in ``[0, 1)``, one a round: rounds ``0 .. R - 2`` draw by pivot rejection, round ``R - 1`` from the
    exact nucleus found by sorting (``sampling.logits.sample_nucleus`` with ``max_rounds = R - 1`` and the same
    uniforms). Returns ``(tokens [B] int32, logprobs [B] float32)``."""
    b, v = logits.shape
    if presence is None:
        presence = jnp.zeros((b, v), bool)
    if constraint is None:
        constraint = ((jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, v), jnp.int32)), jnp.full((b,), -1, jnp.int32),
                      jnp.zeros((b,), jnp.int32))
    (next_state, token_class), cstate, ccon = constraint
    if (presence.shape != (b, v) or u.ndim != 2 or u.shape[0] != b or u.shape[1] < 1 or next_state.ndim != 2
            or token_class.ndim != 2 or token_class.shape[1] != v
            or any(jnp.shape(a) != (b,) for a in (penalty, cstate, ccon, temperature, kth, top_p))):
        raise ValueError(f"select_tokens: logits {logits.shape}, presence {presence.shape}, next_state "
                         f"{next_state.shape}, token_class {token_class.shape}, u {u.shape}, per-row "
                         f"{[jnp.shape(a) for a in (penalty, cstate, ccon, temperature, kth, top_p)]} (want [B, V] "
                         "logits and presence, [S, C] and [NC, V] tables, u [B, R >= 1], [B] per-row values)")
    _require()
    f32, i32 = (functools.partial(jnp.asarray, dtype=d) for d in (jnp.float32, jnp.int32))
    return jax.ffi.ffi_call(SELECT, (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32)))(
        f32(logits), jnp.asarray(presence, bool), f32(penalty), i32(cstate), i32(ccon), i32(next_state),
        i32(token_class), f32(temperature), f32(kth), f32(top_p), f32(u))
