"""The one attention dispatch of the model: ``xla`` | ``pallas`` | ``cudnn`` | ``auto``.

``full_attention`` serves training and scoring (causal, packed segments); ``cached_attention`` serves
sampling (new tokens against a ragged KV cache). Both share the semantics of
``ditto_jax.kernels.reference`` and fall back to it where a kernel does not apply.
"""

from __future__ import annotations

import jax

from ditto_jax.kernels.reference import attention_reference


def resolve_impl(impl: str) -> str:
    """Map ``auto`` to the best implementation for the default backend."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    if backend == "tpu":
        return "pallas"
    return "xla"


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, segment_ids: jax.Array | None,
                   sliding_window: int | None = None) -> jax.Array:
    """Causal self-attention over a whole (possibly packed) sequence: q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]``."""
    impl = resolve_impl(impl)
    if impl == "pallas" and sliding_window is None:
        from ditto_jax.kernels import flash_attention

        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids)
    if impl == "cudnn" and sliding_window is None and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return attention_reference(q, k, v, causal=True, segment_ids=segment_ids, sliding_window=sliding_window)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_offset: jax.Array, impl: str,
                     sliding_window: int | None = None) -> jax.Array:
    """New tokens q ``[B,T,Hq,D]`` (at cache positions ``q_offset[b] + t``) against caches ``[B,S,Hkv,D]``.

    The cache already holds the new tokens' keys and values. One new token per row uses the decode kernel
    when ``impl`` is ``pallas``; everything else uses the masked XLA path.
    """
    impl = resolve_impl(impl)
    if q.shape[1] == 1 and impl == "pallas" and sliding_window is None:
        from ditto_jax.kernels import decode_attention

        return decode_attention(q[:, 0], k_cache, v_cache, q_offset + 1)[:, None]
    return attention_reference(q, k_cache, v_cache, causal=True, q_offset=q_offset, sliding_window=sliding_window)
