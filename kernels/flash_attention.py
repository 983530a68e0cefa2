"""Flash attention (online softmax) with a fused backward pass, for every Pallas lowering.

``flash_attention(q, k, v, causal=True, segment_ids=None, sm_scale=None)`` follows the semantics of
``ditto_jax.kernels.reference`` (causal aligned at the end when Sq < Sk, segment ids, GQA, rows with no
valid key give zeros). Inputs of any length are padded to the block size here and masked in the kernels.
The backward pass is a ``custom_vjp`` whose residuals are the inputs, the output and the log-sum-exp; it runs
a dq kernel and a dk/dv kernel (no [S, S] matrix is ever stored).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp

from ditto_jax.kernels import _flash_triton
from ditto_jax.kernels._common import KV_PAD_SEGMENT, Q_PAD_SEGMENT, FlashProblem
from ditto_jax.kernels._config import BACKEND_ENV, BlockSizes, default_blocks, load_backend, resolve_backend
from ditto_jax.kernels.reference import SegmentIds, attention_reference, split_segment_ids


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _fit_blocks(blocks: BlockSizes, sq: int, sk: int, backend: str) -> BlockSizes:
    """Shrink blocks for short sequences (powers of two, at least 16 so Triton dots stay legal)."""
    if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
        return blocks  # wgmma tiles are fixed multiples of 64; short inputs are padded instead
    q_cap = _pow2_at_least(max(sq, 16))
    k_cap = _pow2_at_least(max(sk, 16))
    fields = {}
    for f in dataclasses.fields(BlockSizes):
        value = getattr(blocks, f.name)
        if value is None or not f.name.startswith("block_"):
            continue
        fields[f.name] = min(value, q_cap if f.name.startswith("block_q") else k_cap)
    return blocks.replace(**fields)


def _mosaic_gpu_ok(q: jax.Array, k: jax.Array) -> bool:
    d = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and d % 64 == 0 and d <= 256


SELF_CHECK_TIMEOUT_S = 300.0


@functools.lru_cache(maxsize=None)
def mosaic_gpu_self_check(head_dim: int, dtype_name: str) -> str | None:
    """Compile and run the Mosaic GPU kernels once on a small causal, padded GQA case and compare with XLA.

    Returns None when they agree, else the reason. ``auto`` uses Mosaic GPU only after this passes (the
    kernels cannot be executed on CPU CI, so a miscompile on a new jax/CUDA must degrade to Triton, not to
    wrong numbers). ``DITTO_ATTN_SELFCHECK=0`` skips it.
    """
    if os.environ.get("DITTO_ATTN_SELFCHECK", "1") == "0":
        return None
    # The first call usually happens while the caller's jit is tracing, and JAX's trace state is per thread:
    # run the check in a fresh thread so it computes concrete values (in the caller's thread every value here
    # would be a tracer; seen on an H200 as a ConcretizationTypeError). A check that neither passes nor fails
    # within SELF_CHECK_TIMEOUT_S counts as failed (the thread is left behind, not waited for).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mosaic-gpu-self-check")
    try:
        return pool.submit(_mosaic_gpu_self_check, head_dim, dtype_name).result(timeout=SELF_CHECK_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        return f"no result within {SELF_CHECK_TIMEOUT_S:.0f} s"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not pick this lowering automatically
        return f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        pool.shutdown(wait=False)


def _mosaic_gpu_self_check(head_dim: int, dtype_name: str) -> str | None:
    """The comparison behind ``mosaic_gpu_self_check`` (raises on failure to compile or run)."""

    dtype = jnp.dtype(dtype_name)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, 200, 4, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (1, 330, 2, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (1, 330, 2, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)

    def both(fn):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    kv_ids = jnp.asarray([[1] * 150 + [2] * 180], jnp.int32)
    for seg in (None, (kv_ids[:, 130:], kv_ids)):  # plain, and packed segments with queries at the end
        got = jax.jit(lambda: both(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg,
                                                                   backend="mosaic_gpu")))()
        want = jax.jit(lambda: both(lambda q, k, v: attention_reference(q, k, v, segment_ids=seg)))()
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6))
            if not err <= 3e-2:
                return f"{name} relative error {err:.3g}{' (segments)' if seg is not None else ''}"
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_seg, kv_seg, p: FlashProblem, blocks: BlockSizes, backend: str):
    o, _ = _forward(q, k, v, q_seg, kv_seg, p, blocks, backend)
    return o


def _forward(q, k, v, q_seg, kv_seg, p, blocks, backend):
    if backend in ("triton", "interpret"):
        return _flash_triton.flash_fwd(q, k, v, q_seg, kv_seg, p, blocks, interpret=backend == "interpret")
    if backend in ("mosaic_tpu", "tpu_interpret"):
        return load_backend("_flash_tpu").flash_fwd(q, k, v, q_seg, kv_seg, p, blocks,
                                                    interpret=backend == "tpu_interpret")
    if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
        return load_backend("_flash_mgpu").flash_fwd(q, k, v, q_seg, kv_seg, p, blocks,
                                                     interpret=backend == "mosaic_gpu_interpret")
    raise ValueError(f"unknown flash-attention backend {backend!r}")


def _flash_fwd_rule(q, k, v, q_seg, kv_seg, p, blocks, backend):
    o, lse = _forward(q, k, v, q_seg, kv_seg, p, blocks, backend)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd_rule(p, blocks, backend, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    if backend in ("mosaic_tpu", "tpu_interpret"):
        dq, dk, dv = load_backend("_flash_tpu").flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p, blocks,
                                                          interpret=backend == "tpu_interpret")
    elif backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
        dq, dk, dv = load_backend("_flash_mgpu").flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p, blocks,
                                                           interpret=backend == "mosaic_gpu_interpret")
    else:
        dq, dk, dv = _flash_triton.flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p, blocks,
                                             interpret=backend == "interpret")
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: q, k, v must be [B,S,H,D]; got q{q.shape} k{k.shape} v{v.shape}")
    b, _, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k{k.shape} and v{v.shape} differ")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: k{k.shape} does not match q{q.shape} in batch or head dim")
    if hq % k.shape[2]:
        raise ValueError(f"flash_attention: q heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool = True,
    segment_ids: SegmentIds = None,
    sm_scale: float | None = None,
    *,
    backend: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Attention of q ``[B,Sq,Hq,D]`` over k/v ``[B,Sk,Hkv,D]`` -> ``[B,Sq,Hq,D]`` (q's dtype).

    Args:
      causal: query ``i`` attends to kv positions ``<= i + Sk - Sq``.
      segment_ids: ``[B,S]`` int (Sq == Sk) or a ``(q_ids [B,Sq], kv_ids [B,Sk])`` pair; tokens attend only
        inside their segment. ``INT32_MIN`` and ``INT32_MIN + 1`` are reserved for padding.
      sm_scale: softmax scale, default ``1/sqrt(D)``.
      backend: see ``ditto_jax.kernels._config`` (default ``auto``: best lowering for the platform).
      block_sizes: tiles and launch parameters (default: per backend, overridable by ``DITTO_ATTN_BLOCKS``).
    """
    _check_inputs(q, k, v)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    requested = backend
    backend = resolve_backend(backend, mosaic_gpu_ok=_mosaic_gpu_ok(q, k))
    if backend == "mosaic_gpu" and (requested or os.environ.get(BACKEND_ENV) or "auto") == "auto":
        reason = mosaic_gpu_self_check(d, jnp.dtype(q.dtype).name)
        if reason is not None:
            warnings.warn(f"flash_attention: Mosaic GPU self-check failed ({reason}); using Triton", stacklevel=2)
            backend = "triton"
    if backend in ("mosaic_gpu", "mosaic_gpu_interpret") and not _mosaic_gpu_ok(q, k):
        raise ValueError(f"mosaic_gpu flash attention needs bf16/fp16 and head dim % 64 == 0; got {q.dtype}, D={d}")
    blocks = _fit_blocks(default_blocks(backend, block_sizes), sq, sk, backend)
    q_mult = max(blocks.block_q, *blocks.dq[:1], *blocks.dkv[:1])
    k_mult = max(blocks.block_kv, blocks.dq[1], blocks.dkv[1])
    if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):  # two consumer warpgroups per tile
        q_mult = max(q_mult, 2 * blocks.block_q, 2 * blocks.dq[0] if blocks.mgpu_bwd else 0)
        k_mult = max(k_mult, 2 * blocks.dkv[1] if blocks.mgpu_bwd else 0)
    sq_pad, sk_pad = _round_up(sq, q_mult), _round_up(sk, k_mult)

    q_ids, kv_ids = split_segment_ids(segment_ids, sq, sk)
    if q_ids is not None:
        if q_ids.shape != (b, sq) or kv_ids.shape != (b, sk):
            raise ValueError(f"flash_attention: segment ids {q_ids.shape}/{kv_ids.shape} must be [B,Sq]/[B,Sk] = "
                             f"{(b, sq)}/{(b, sk)}")
        q_ids = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, sq_pad - sq)), constant_values=Q_PAD_SEGMENT)
        kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, sk_pad - sk)), constant_values=KV_PAD_SEGMENT)

    problem = FlashProblem(
        sq=sq, sk=sk, sq_pad=sq_pad, sk_pad=sk_pad, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
        causal=bool(causal), sm_scale=float(sm_scale if sm_scale is not None else d**-0.5),
        has_segments=q_ids is not None,
    )
    if sq_pad != sq:
        q = jnp.pad(q, ((0, 0), (0, sq_pad - sq), (0, 0), (0, 0)))
    if sk_pad != sk:
        k = jnp.pad(k, ((0, 0), (0, sk_pad - sk), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sk_pad - sk), (0, 0), (0, 0)))
    o = _flash(q, k, v, q_ids, kv_ids, problem, blocks, backend)
    return o[:, :sq] if sq_pad != sq else o
