"""Pieces every flash-attention lowering shares: the static problem description, block ranges for causal
skipping, and the in-kernel mask.

Conventions inside the kernels (all lowerings):
- scores live in the log2 domain: ``s = q.k * sm_scale * log2(e)``, so softmax uses ``exp2``;
- masked scores are set to ``MASK`` (finite); a row whose running max is still ``MASK`` has seen no valid key
  and ends as zeros, with ``lse = -MASK`` so that the backward pass gives it ``p = 0`` everywhere;
- the residual ``lse`` (log2 domain, float32) is ``[B, Hq, Sq_pad]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

MASK = -1e30
LOG2E = math.log2(math.e)
# Segment ids used for padding rows: never equal to each other, and reserved (callers must not use INT32_MIN).
KV_PAD_SEGMENT = -(2**31)
Q_PAD_SEGMENT = -(2**31) + 1


@dataclasses.dataclass(frozen=True)
class FlashProblem:
    """Static description of one flash-attention call (hashable; shapes already padded)."""

    sq: int  # real query length
    sk: int  # real key length
    sq_pad: int
    sk_pad: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    sm_scale: float
    has_segments: bool

    @property
    def groups(self) -> int:
        """Query heads per kv head."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def offset(self) -> int:
        """Causal alignment: query ``i`` sits at kv position ``i + offset``."""
        return self.sk - self.sq

    @property
    def kv_padded(self) -> bool:
        """Whether padded kv rows exist (and need masking when there are no segment ids)."""
        return self.sk_pad != self.sk

    @property
    def scale_log2(self) -> float:
        """Score scale in the log2 domain."""
        return self.sm_scale * LOG2E


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """``a @ b`` (optionally transposed operands) accumulated in float32 (float64 for float64 inputs), at full
    precision for float inputs (so float32 kernels match the reference to ~1e-6)."""
    acc = jnp.float64 if a.dtype == jnp.float64 else jnp.float32
    precision = lax.Precision.HIGHEST if a.dtype in (jnp.float32, jnp.float64) else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc)


def _floordiv_nonneg(x: jax.Array, d: int) -> jax.Array:
    """``max(x, 0) // d`` with only non-negative operands (portable across Triton/Mosaic lowerings)."""
    return lax.div(jnp.maximum(x, 0), jnp.int32(d))


def kv_range(p: FlashProblem, q_block: jax.Array, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """For query block ``q_block``: ``(mid, hi)`` such that kv blocks ``[0, mid)`` need no mask and
    ``[mid, hi)`` need the mask; blocks ``>= hi`` are skipped (fully above the causal diagonal)."""
    nk = p.sk_pad // bk
    q_block = jnp.asarray(q_block, jnp.int32)
    if p.causal:
        end = q_block * bq + bq + p.offset  # exclusive bound on kv positions any row of the block sees
        hi = jnp.minimum(_floordiv_nonneg(end + (bk - 1), bk), nk)
        mid = _floordiv_nonneg(q_block * bq + p.offset + 1, bk)
    else:
        hi = jnp.int32(nk)
        mid = jnp.int32(nk)
    if p.has_segments:
        mid = jnp.int32(0)
    elif p.kv_padded:
        mid = jnp.minimum(mid, p.sk // bk)
    return jnp.minimum(mid, hi), hi


def q_range(p: FlashProblem, kv_block: jax.Array, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """For kv block ``kv_block``: ``(lo, mid)`` such that query blocks ``[lo, mid)`` need the mask and
    ``[mid, nq)`` need none; blocks ``< lo`` are skipped (the whole block lies before these keys).

    Padded kv rows need no mask here: their dk/dv rows are sliced off by the caller.
    """
    nq = p.sq_pad // bq
    kv_block = jnp.asarray(kv_block, jnp.int32)
    if p.causal:
        lo = jnp.minimum(_floordiv_nonneg(kv_block * bk - p.offset, bq), nq)
        mid = _floordiv_nonneg(kv_block * bk + bk - 1 - p.offset + (bq - 1), bq)
    else:
        lo = jnp.int32(0)
        mid = jnp.int32(0)
    if p.has_segments:
        mid = jnp.int32(nq)
    mid = jnp.clip(mid, lo, nq)
    return lo, mid


def block_mask(
    p: FlashProblem,
    q_start: jax.Array,
    kv_start: jax.Array,
    bq: int,
    bk: int,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    *,
    check_kv_len: bool = True,
) -> jax.Array | None:
    """Boolean ``[bq, bk]`` mask (True = attend) for the tile at ``(q_start, kv_start)``.

    ``q_seg`` is ``[bq, 1]`` and ``kv_seg`` ``[1, bk]`` when segment ids are used.
    """
    mask = None
    if p.causal or (check_kv_len and p.kv_padded and not p.has_segments):
        q_pos = q_start + p.offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        if p.causal:
            mask = kv_pos <= q_pos
        if check_kv_len and p.kv_padded and not p.has_segments:
            in_len = kv_pos < p.sk
            mask = in_len if mask is None else mask & in_len
    if p.has_segments:
        assert q_seg is not None and kv_seg is not None
        same = q_seg == kv_seg
        mask = same if mask is None else mask & same
    return mask


def finalize(acc: jax.Array, m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(o, lse)`` from the online-softmax state; rows that saw no valid key give ``o = 0``, ``lse = -MASK``."""
    empty = m <= MASK / 2  # robust to rounding of a scaled MASK
    safe_l = jnp.where(empty | (l == 0), 1.0, l)
    o = jnp.where(empty[:, None], 0.0, acc / safe_l[:, None])
    lse = jnp.where(empty, -MASK, m + jnp.log2(safe_l))
    return o, lse
