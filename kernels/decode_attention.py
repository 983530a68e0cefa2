"""Decode attention (one new token per row) over a ragged KV cache, split-K ("flash-decoding").

``decode_attention(q, k_cache, v_cache, lengths, sm_scale=None)``: q ``[B,Hq,D]``, caches ``[B,S,Hkv,D]``,
row ``b`` attends to cache positions ``< lengths[b]`` (a row of length 0 gives zeros). The cache is split
into ``num_splits`` partitions processed in parallel, each producing a partial (unnormalised output, running
max, running sum); a small XLA step combines them. All query heads of a GQA group share one pass over their
kv head. Forward only (sampling needs no gradient).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ditto_jax.kernels import _decode_triton
from ditto_jax.kernels._common import LOG2E
from ditto_jax.kernels._config import DecodeBlockSizes, default_decode_blocks, load_backend, resolve_backend

_TARGET_PROGRAMS = 1024  # GPU: enough (split, row, head) programs to fill ~132 SMs several times over


def choose_num_splits(batch: int, kv_heads: int, num_blocks: int, backend: str) -> int:
    """Split count: on GPU enough programs to fill the chip; on TPU one split per core pair is plenty."""
    if backend in ("mosaic_tpu", "tpu_interpret"):
        return 1 if batch >= 2 else min(2, num_blocks)
    want = max(1, _TARGET_PROGRAMS // max(1, batch * kv_heads))
    return max(1, min(want, num_blocks))


def combine_partials(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge split partials ``acc [B,ns,Hq,D]``, ``m``/``l [B,ns,Hq]`` (log2 domain) into ``[B,Hq,D]``."""
    m_max = m.max(axis=1, keepdims=True)
    w = jnp.exp2(m - m_max)
    num = (acc * w[..., None]).sum(axis=1)
    den = (l * w).sum(axis=1)
    return jnp.where((den > 0)[..., None], num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def _block_for(s_len: int, block_kv: int, min_block: int) -> int:
    """Largest block ``<= block_kv`` dividing the cache length (no cache copy), or 0 when none fits."""
    bk = math.gcd(s_len, block_kv)
    return bk if bk >= min_block else 0


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    sm_scale: float | None = None,
    *,
    backend: str | None = None,
    block_sizes: DecodeBlockSizes | None = None,
) -> jax.Array:
    """One query token per row against a ragged cache -> ``[B,Hq,D]`` in q's dtype (see module doc)."""
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q must be [B,Hq,D] and caches [B,S,Hkv,D]; got q{q.shape} "
                         f"k{k_cache.shape} v{v_cache.shape}")
    b, hq, d = q.shape
    _, s_len, hkv, dk = k_cache.shape
    if k_cache.shape[0] != b or dk != d or hq % hkv:
        raise ValueError(f"decode_attention: q{q.shape} does not match cache {k_cache.shape} (batch, head dim, "
                         "or q heads not a multiple of kv heads)")
    if lengths.shape != (b,):
        raise ValueError(f"decode_attention: lengths must be [B]={b}, got {lengths.shape}")
    backend = resolve_backend(backend, mosaic_gpu_ok=False)
    if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):  # memory-bound: the Triton kernel streams HBM fine
        backend = "triton" if backend == "mosaic_gpu" else "interpret"
    blocks = default_decode_blocks(block_sizes)
    tpu = backend in ("mosaic_tpu", "tpu_interpret")
    interpret = backend in ("interpret", "tpu_interpret")
    bk = _block_for(s_len, blocks.block_kv, 1 if interpret else (128 if tpu else 16))
    if bk == 0:  # awkward cache length: pad (a copy of the cache; allocate caches in block multiples)
        bk = blocks.block_kv
        pad = -s_len % bk
        k_cache = jnp.pad(k_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
        s_len += pad
    blocks = blocks.replace(block_kv=bk)
    num_blocks = s_len // bk
    ns = blocks.num_splits or choose_num_splits(b, hkv, num_blocks, backend)
    ns = max(1, min(ns, num_blocks))
    scale = float(sm_scale if sm_scale is not None else d**-0.5)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_len)
    impl = load_backend("_decode_tpu") if tpu else _decode_triton
    acc, m, l = impl.decode_partials(q, k_cache, v_cache, lengths, scale_log2=scale * LOG2E, blocks=blocks,
                                     num_splits=ns, interpret=interpret)
    return combine_partials(acc, m, l).astype(q.dtype)
