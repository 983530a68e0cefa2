"""The blocked causal XLA attention equals the reference (values and gradients), packed and GQA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditto_jax.kernels.reference import attention_reference
from ditto_jax.model.attention import cached_attention
from ditto_jax.model.xla_attention import (
    blocked_causal_attention,
    cached_chunk_attention,
    heads_first_query_attention,
    read_widths,
    single_query_attention,
)


@pytest.mark.parametrize("block, heads, kv_heads, packed", [(16, 4, 2, True), (32, 4, 1, False), (24, 2, 2, True)])
def test_blocked_attention_matches_reference(block: int, heads: int, kv_heads: int, packed: bool) -> None:
    b, s, d = 2, 64, 8
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(k1, (b, s, heads, d))
    k = jax.random.normal(k2, (b, s, kv_heads, d))
    v = jax.random.normal(k3, (b, s, kv_heads, d))
    seg = None
    if packed:
        ids = np.ones((b, s), np.int32)
        ids[0, 20:] = 2
        ids[1, 40:] = 0  # padding tail
        seg = jnp.asarray(ids)

    @jax.jit
    def ours(q, k, v):
        return blocked_causal_attention(q, k, v, seg, block=block)

    @jax.jit
    def ref(q, k, v):
        return attention_reference(q, k, v, causal=True, segment_ids=seg)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(2), (b, s, heads, d))
    g_ours = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-4)


def test_bf16_inputs_keep_their_dtype() -> None:
    q = jnp.ones((1, 32, 2, 8), jnp.bfloat16)
    attend = jax.jit(lambda q, k, v: blocked_causal_attention(q, k, v, block=16))
    assert attend(q, q[:, :, :1], q[:, :, :1]).dtype == jnp.bfloat16


@pytest.mark.parametrize("window", [None, 5])
def test_single_query_attention_both_cache_layouts_match_reference(window) -> None:
    rng = np.random.RandomState(0)
    b, s, hq, hkv, d = 3, 12, 6, 2, 8
    q = jnp.asarray(rng.randn(b, hq, d), jnp.float32)
    k = jnp.asarray(rng.randn(b, s, hkv, d), jnp.float32)
    v = jnp.asarray(rng.randn(b, s, hkv, d), jnp.float32)
    pos = jnp.asarray([0, 7, 11], jnp.int32)
    reference = jax.jit(lambda q, k, v, off: attention_reference(q, k, v, causal=True, q_offset=off,
                                                                 sliding_window=window))
    want = np.stack([np.asarray(reference(q[i:i + 1, None], k[i:i + 1, : int(pos[i]) + 1],
                                          v[i:i + 1, : int(pos[i]) + 1], pos[i:i + 1]))[0, 0] for i in range(b)])
    got = jax.jit(single_query_attention, static_argnums=4)(q, k, v, pos, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    got_hf = jax.jit(heads_first_query_attention, static_argnums=4)(q, jnp.transpose(k, (0, 2, 3, 1)),
                                                                    jnp.transpose(v, (0, 2, 1, 3)), pos, window)
    np.testing.assert_allclose(np.asarray(got_hf), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 50])
def test_heads_first_attention_reads_only_the_width_it_is_given(window) -> None:
    """With ``width`` only the first ``width`` positions are read: rows below it get exactly what the full read
    gives; a row beyond it does not (the width is not ignored)."""
    rng = np.random.RandomState(2)
    b, s, hq, hkv, d = 4, 300, 6, 2, 8
    assert read_widths(s) == [128, 300] and read_widths(256) == [128, 256] and read_widths(192) == [192]
    q = jnp.asarray(rng.randn(b, hq, d), jnp.float32)
    k = jnp.asarray(rng.randn(b, hkv, d, s), jnp.float32)
    v = jnp.asarray(rng.randn(b, hkv, s, d), jnp.float32)
    pos = jnp.asarray([0, 100, 200, 299], jnp.int32)
    attend = jax.jit(heads_first_query_attention, static_argnums=(4, 5))
    full = np.asarray(attend(q, k, v, pos, window))
    for width in (128, 256, 300):  # any static width works; the engine picks from read_widths
        got = np.asarray(attend(q, k, v, pos, window, width))
        rows = np.asarray(pos) < width
        np.testing.assert_allclose(got[rows], full[rows], atol=1e-6, rtol=0)
        if not rows.all():
            assert not np.allclose(got[~rows], full[~rows], atol=1e-3)


@pytest.mark.parametrize("heads, kv_heads, window", [(6, 2, None), (4, 4, None), (6, 2, 4)])
def test_cached_chunk_attention_matches_reference(heads: int, kv_heads: int, window: int | None) -> None:
    """T new tokens per row at ragged offsets against a cache holding them (with or without a sliding window):
    the reference's values, and the dispatch (``cached_attention`` under ``xla``) takes this path for T > 1."""
    rng = np.random.RandomState(3)
    b, t, s, d = 3, 5, 24, 8
    q = jnp.asarray(rng.randn(b, t, heads, d), jnp.float32)
    k = jnp.asarray(rng.randn(b, s, kv_heads, d), jnp.float32)
    v = jnp.asarray(rng.randn(b, s, kv_heads, d), jnp.float32)
    off = jnp.asarray([0, 7, 19], jnp.int32)  # the last row's chunk ends exactly at the cache's end
    want = np.asarray(jax.jit(lambda *a: attention_reference(*a[:3], causal=True, q_offset=a[3],
                                                             sliding_window=window))(q, k, v, off))
    chunk = jax.jit(cached_chunk_attention, static_argnums=4)
    np.testing.assert_allclose(np.asarray(chunk(q, k, v, off, window)), want, atol=1e-5, rtol=0)
    got = jax.jit(lambda *a: cached_attention(*a[:3], q_offset=a[3], impl="xla", sliding_window=window))(q, k, v, off)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    # positions past a row's last query are never read: changing them changes nothing
    k2 = k.at[0, t:].set(100.0)
    np.testing.assert_allclose(np.asarray(chunk(q, k2, v, off, window))[0], want[0], atol=1e-5, rtol=0)
