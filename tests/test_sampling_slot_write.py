"""Prefilled rows written into a heads-first slot cache: exactly the written slots change, each to its row."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ditto_jax.model import KVCache, LayerCache
from ditto_jax.sampling.sampler import _select_rows_heads_first


@pytest.mark.parametrize("w", [14, 8])  # rows wider than the cache (the tail is dropped) or narrower (zeros after)
def test_select_write_changes_only_the_written_slots(w: int) -> None:
    rng = np.random.RandomState(0)
    layers, b, s, h, d, g = 2, 5, 12, 2, 3, 3
    k0 = [rng.randn(b, h, d, s).astype(np.float32) for _ in range(layers)]
    v0 = [rng.randn(b, h, s, d).astype(np.float32) for _ in range(layers)]
    cache = LayerCache(k=tuple(map(jnp.asarray, k0)), v=tuple(map(jnp.asarray, v0)),
                       lengths=jnp.zeros((b,), jnp.int32), heads_first=True)
    sk, sv = rng.randn(layers, g, w, h, d).astype(np.float32), rng.randn(layers, g, w, h, d).astype(np.float32)
    slots = np.asarray([3, 0, b], np.int32)  # the last is a padding row (>= B): dropped
    k, v = _select_rows_heads_first(cache, KVCache(k=jnp.asarray(sk), v=jnp.asarray(sv), lengths=None),
                                    jnp.asarray(slots))
    for i in range(layers):
        want_k, want_v = k0[i].copy(), v0[i].copy()
        for r, slot in enumerate(slots[:2]):
            rk, rv = np.zeros((s, h, d), np.float32), np.zeros((s, h, d), np.float32)
            rk[:min(w, s)], rv[:min(w, s)] = sk[i, r, :s], sv[i, r, :s]
            want_k[slot], want_v[slot] = np.transpose(rk, (1, 2, 0)), np.transpose(rv, (1, 0, 2))
        np.testing.assert_array_equal(np.asarray(k[i]), want_k)
        np.testing.assert_array_equal(np.asarray(v[i]), want_v)
