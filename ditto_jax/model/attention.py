"""The one attention dispatch of the model: ``xla`` | ``pallas`` | ``cudnn`` | ``auto``.

``full_attention`` serves training and scoring (causal, packed segments); ``cached_attention`` serves
sampling (new tokens against a ragged KV cache). Both share the semantics of ``ditto_jax.kernels.reference``.

- ``xla``: the plain-XLA reference (any backend, any feature).
- ``pallas``: ``ditto_jax.kernels`` (flash attention with fused backward; split-K decode for one new token
  per row), lowered for the platform (Mosaic TPU, Mosaic GPU on Hopper, Triton on other GPUs, the
  interpreter on CPU). With an active mesh (``jax.set_mesh``) the kernels run under ``shard_map`` over batch
  (``data``/``fsdp``) and heads (``tensor``).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on GPU. cuDNN's packed-sequence
  interface needs per-row segment offsets rather than segment ids, so calls with ``segment_ids`` use
  ``pallas`` instead; so do cache calls (decode).
- ``auto``: ``pallas`` on TPU, ``cudnn`` on GPU (``pallas`` where cuDNN does not apply), ``xla`` on CPU
  (the interpreter is for tests, not speed).

Sliding-window attention is not in the kernels: it always takes the ``xla`` path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.kernels import decode_attention, flash_attention
from ditto_jax.kernels.reference import attention_reference
from ditto_jax.kernels.sharding import shard_over_batch_and_heads
from ditto_jax.mesh import DEFAULT_RULES
from ditto_jax.model.xla_attention import (
    blocked_causal_attention,
    cached_chunk_attention,
    heads_first_query_attention,
    single_query_attention,
)


def resolve_impl(impl: str) -> str:
    """Map ``auto`` to the best implementation for the default backend."""
    if impl != "auto":
        return impl
    return {"tpu": "pallas", "gpu": "cudnn"}.get(jax.default_backend(), "xla")


def _mesh_axes() -> dict[str, tuple[str, ...]]:
    return {"batch_axes": DEFAULT_RULES["batch"] or (), "head_axes": DEFAULT_RULES["q_heads"] or ()}


def _pallas_full(q, k, v, segment_ids):
    def fn(q, k, v, seg):
        return flash_attention(q, k, v, causal=True, segment_ids=seg)

    return shard_over_batch_and_heads(
        fn, (q, k, v, segment_ids), ("bshd", "bskd", "bskd", "bs"), "bshd",
        batch=q.shape[0], q_heads=q.shape[2], kv_heads=k.shape[2], **_mesh_axes(),
    )


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, segment_ids: jax.Array | None,
                   sliding_window: int | None = None, cpu_kernel: bool = False) -> jax.Array:
    """Causal self-attention over a whole (possibly packed) sequence: q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]``.
    ``cpu_kernel``: the caller vouches for one CPU device; float32 attention under the ``xla`` implementation then
    runs ``kernels.cpu.causal_attention`` (forward and backward kernels) when OpenBLAS is there."""
    impl = resolve_impl(impl)
    if sliding_window is not None:
        return attention_reference(q, k, v, causal=True, segment_ids=segment_ids, sliding_window=sliding_window)
    if impl == "xla" and cpu_kernels.matmul_serves(cpu_kernel, q, k, v):
        seg = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        return cpu_kernels.causal_attention(q, k, v, seg)
    if impl == "xla":  # same result as the reference; skips the masked upper triangle (2-4x faster on CPU)
        return blocked_causal_attention(q, k, v, segment_ids)
    if impl == "cudnn" and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl in ("pallas", "cudnn"):
        return _pallas_full(q, k, v, segment_ids)
    raise ValueError(f"attention implementation {impl!r} not in xla|pallas|cudnn|auto")


def _cpu_decode_kernel(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, impl: str, heads_first: bool,
                       cpu_kernel: bool) -> bool:
    """Whether ``kernels.cpu.decode_attention`` serves this call: one new token per row on the xla path against a
    heads-first float32 cache, the caller vouching for the kernels (``cpu_kernel``)."""
    return (heads_first and cpu_kernel and q.shape[1] == 1 and resolve_impl(impl) == "xla"
            and k_cache.dtype == v_cache.dtype == jnp.float32)


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *,
                     lengths: jax.Array, impl: str, sliding_window: int | None = None, heads_first: bool = False,
                     width: int | None = None, cpu_kernel: bool = False,
                     shared: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new token per row: write its key and value (``k``/``v [B, 1, Hkv, D]``) at ``lengths [B]`` into the
    caches (an index past the end is dropped), then ``cached_attention``. Returns ``(o [B, 1, Hq, D], k_cache,
    v_cache)``. On the CPU kernel path (see ``cached_attention``) ``kernels.cpu.decode_attention`` writes them in
    place itself (XLA's scatter of one key per row into the heads-first ``[B, Hkv, D, S]`` keys is strided: 0.45 ms
    of a 15 ms step for the 40M model at 16 rows)."""
    if _cpu_decode_kernel(q, k_cache, v_cache, impl, heads_first, cpu_kernel):
        o, k_cache, v_cache = cpu_kernels.decode_attention(q[:, 0], k_cache, v_cache, lengths, sliding_window,
                                                           shared=shared, new_kv=(k[:, 0], v[:, 0]))
        return o.astype(q.dtype)[:, None], k_cache, v_cache
    rows = jnp.arange(q.shape[0], dtype=jnp.int32)
    # The indexed views are [B, Hkv, D] in either layout.
    k_at, v_at = (((rows, slice(None), slice(None), lengths), (rows, slice(None), lengths))
                  if heads_first else ((rows, lengths),) * 2)
    k_cache = k_cache.at[k_at].set(k[:, 0].astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[v_at].set(v[:, 0].astype(v_cache.dtype), mode="drop")
    o = cached_attention(q, k_cache, v_cache, q_offset=lengths, impl=impl, sliding_window=sliding_window,
                         heads_first=heads_first, width=width, cpu_kernel=cpu_kernel, shared=shared)
    return o, k_cache, v_cache


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_offset: jax.Array, impl: str,
                     sliding_window: int | None = None, heads_first: bool = False,
                     width: int | None = None, cpu_kernel: bool = False,
                     shared: tuple[jax.Array, jax.Array] | None = None, layer: jax.Array | None = None) -> jax.Array:
    """New tokens q ``[B,T,Hq,D]`` (at cache positions ``q_offset[b] + t``) against caches ``[B,S,Hkv,D]``
    (``[B,Hkv,S,D]`` when ``heads_first``: one new token per row, plain-XLA path only; ``width``: read only that
    many positions, see ``heads_first_query_attention``).

    The cache already holds the new tokens' keys and values. One new token per row uses the split-K decode
    kernel under ``pallas``/``cudnn`` and ``single_query_attention`` under ``xla``; prefill chunks use
    ``cached_chunk_attention`` under ``xla`` and the masked reference otherwise (and for sliding windows on the
    kernel paths). ``cpu_kernel`` (the caller vouches for one CPU device and ``kernels.cpu.available()``): a
    heads-first float32 cache runs ``kernels.cpu.decode_attention``, which reads each row only up to its
    position (``width`` is then moot), and reads the positions rows share (``shared``: ``(lead [B], length [B])``,
    see ``kernels.cpu.decode_attention``) once for all of them; other paths ignore ``shared``. With ``cpu_kernel``
    a float32 cache in the ``[B, S, Hkv, D]`` layout without a window runs ``kernels.cpu.chunk_attention`` (the
    prompt phases).

    ``layer`` (a scalar): the caches are the model's stacked ``[L, ...]`` caches and this is the layer to read (the
    CPU kernel reads it in place; the other paths slice it).
    """
    impl = resolve_impl(impl)
    if (cpu_kernel and not heads_first and impl == "xla" and sliding_window is None
            and k_cache.dtype == v_cache.dtype == jnp.float32 and cpu_kernels.decode_reason() is None):
        return cpu_kernels.chunk_attention(q, k_cache, v_cache, q_offset, layer).astype(q.dtype)
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    if heads_first:
        if q.shape[1] != 1 or impl != "xla":
            raise ValueError(f"a heads-first cache serves one new token per row on the xla path (got "
                             f"{q.shape[1]} tokens, attention {impl!r}); build the cache with heads_first=False")
        if _cpu_decode_kernel(q, k_cache, v_cache, impl, heads_first, cpu_kernel):
            o = cpu_kernels.decode_attention(q[:, 0], k_cache, v_cache, q_offset, sliding_window, shared=shared)
            return o.astype(q.dtype)[:, None]
        return heads_first_query_attention(q[:, 0], k_cache, v_cache, q_offset, sliding_window, width)[:, None]
    if q.shape[1] == 1 and impl in ("pallas", "cudnn") and sliding_window is None:
        o = shard_over_batch_and_heads(
            decode_attention, (q[:, 0], k_cache, v_cache, q_offset + 1), ("bhd", "bskd", "bskd", "b"), "bhd",
            batch=q.shape[0], q_heads=q.shape[2], kv_heads=k_cache.shape[2], **_mesh_axes(),
        )
        return o[:, None]
    if q.shape[1] == 1 and impl == "xla":
        return single_query_attention(q[:, 0], k_cache, v_cache, q_offset, sliding_window)[:, None]
    if impl == "xla":
        return cached_chunk_attention(q, k_cache, v_cache, q_offset, sliding_window)
    return attention_reference(q, k_cache, v_cache, causal=True, q_offset=q_offset, sliding_window=sliding_window)
