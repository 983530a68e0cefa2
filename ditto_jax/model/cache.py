"""Preallocated KV caches, updated in place inside jit: ``KVCache`` (all layers stacked, for the scanned forward)
and ``LayerCache`` (one array per layer, for the unrolled decode step)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ditto_jax.model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys/values ``[L, B, S, Hkv, D]`` and ``lengths [B]``: row ``b`` holds ``lengths[b]`` valid tokens.

    A forward pass over ``T`` new tokens writes them at ``lengths[b] .. lengths[b]+T-1`` and returns the cache
    with ``lengths + T``; a caller that fed right-padded rows resets ``lengths`` to the true lengths (the
    padding slots are overwritten by later writes).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        """Capacity in tokens per row."""
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        """Number of rows."""
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An empty cache for ``batch`` rows of ``max_len`` tokens (in the compute dtype by default)."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    dt = dtype or cfg.compute_dtype
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), lengths=jnp.zeros((batch,), jnp.int32))


@flax.struct.dataclass
class LayerCache:
    """The KV cache as one ``[B, S, Hkv, D]`` array per layer (tuples ``k``/``v``) and ``lengths [B]``, the same
    contract as ``KVCache``: ``decode_step`` reads and writes each layer's array in place (a slice of a stacked
    ``[L, ...]`` array would be copied on CPU)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        """Capacity in tokens per row."""
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        """Number of rows."""
        return self.k[0].shape[0]


def init_layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> LayerCache:
    """An empty ``LayerCache`` (a separate buffer per layer, so each can be donated and updated in place)."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    dt = dtype or cfg.compute_dtype
    return LayerCache(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                      v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                      lengths=jnp.zeros((batch,), jnp.int32))
