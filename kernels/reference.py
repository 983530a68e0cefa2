"""Plain-XLA attention: the reference every kernel is tested against, and the model's ``xla`` path.

Semantics shared by all attention implementations in this package:
- q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``, ``Hq % Hkv == 0`` (GQA/MQA, k/v never repeated in memory).
- ``causal``: query ``i`` sits at kv position ``q_offset[b] + i``; by default ``q_offset = Sk - Sq`` (causal
  aligned at the end, as in chunked prefill) and a query attends to kv positions ``<=`` its own.
- ``kv_lengths [B]``: kv position ``j`` is valid only when ``j < kv_lengths[b]`` (ragged caches).
- ``segment_ids``: ``[B, S]`` (Sq == Sk) or a ``(q_ids [B,Sq], kv_ids [B,Sk])`` pair; a query attends only to
  keys of its own segment.
- ``sliding_window`` W: a query at position p attends to kv positions ``> p - W``.
- A query row with no valid key returns zeros (never NaN). Softmax in float32; output in q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SegmentIds = jax.Array | tuple[jax.Array, jax.Array] | None


def split_segment_ids(segment_ids: SegmentIds, sq: int, sk: int) -> tuple[jax.Array | None, jax.Array | None]:
    """Normalise ``segment_ids`` to a ``(q_ids, kv_ids)`` pair (or ``(None, None)``)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_ids, kv_ids = segment_ids
    else:
        if sq != sk:
            raise ValueError(f"a single segment_ids array needs Sq == Sk, got Sq={sq}, Sk={sk}; pass (q_ids, kv_ids)")
        q_ids = kv_ids = segment_ids
    return q_ids, kv_ids


def attention_mask(
    batch: int,
    sq: int,
    sk: int,
    *,
    causal: bool = True,
    segment_ids: SegmentIds = None,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """The boolean mask ``[B, Sq, Sk]`` (True = attend) implied by the shared semantics above."""
    kv_pos = jnp.arange(sk, dtype=jnp.int32)[None, None, :]
    offset = jnp.full((batch,), sk - sq, jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    q_pos = offset[:, None, None] + jnp.arange(sq, dtype=jnp.int32)[None, :, None]
    mask = jnp.ones((batch, sq, sk), dtype=bool)
    if causal:
        mask &= kv_pos <= q_pos
    if sliding_window is not None:
        mask &= kv_pos > q_pos - sliding_window
    if kv_lengths is not None:
        mask &= kv_pos < kv_lengths.astype(jnp.int32)[:, None, None]
    q_ids, kv_ids = split_segment_ids(segment_ids, sq, sk)
    if q_ids is not None:
        mask &= q_ids[:, :, None] == kv_ids[:, None, :]
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: SegmentIds = None,
    sm_scale: float | None = None,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    sliding_window: int | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Attention in plain XLA ops (grouped einsums, float32 softmax). ``mask`` overrides the built one."""
    b, sq, hq, d = q.shape
    _, sk, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    g = hq // hkv
    scale = (1.0 / d**0.5) if sm_scale is None else sm_scale
    if mask is None:
        mask = attention_mask(
            b, sq, sk, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
            kv_lengths=kv_lengths, sliding_window=sliding_window,
        )
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(b, sq, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc) * scale
    m = mask[:, None, None, :, :]
    s = jnp.where(m, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(m, jnp.exp(s - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype) if v.dtype != acc else p, v, preferred_element_type=acc)
    return o.reshape(b, sq, hq, d).astype(q.dtype)


def decode_reference(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, sm_scale: float | None = None
) -> jax.Array:
    """One query token per row: q ``[B,Hq,D]`` over caches ``[B,S,Hkv,D]`` valid up to ``lengths[b]``."""
    o = attention_reference(q[:, None], k_cache, v_cache, causal=False, kv_lengths=lengths, sm_scale=sm_scale)
    return o[:, 0]
