"""Cached decoding (ragged right-padded prefill, then one token at a time) equals full recomputation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ditto_jax.model import ModelConfig, create_model, decode_step, decode_weights, init_cache, init_layer_cache


def test_cached_decoding_equals_full_recompute():
    # Every optional path at once: GQA->MQA, qkv bias, q/k norm, head_dim != hidden/heads, a sliding window
    # shorter than the sequences.
    cfg = ModelConfig(architecture="qwen3", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=1, head_dim=16, intermediate_size=64, qkv_bias=True, qk_norm=True,
                      sliding_window=5, max_position_embeddings=64)
    model = create_model(cfg, seed=1)
    rng = np.random.RandomState(0)
    prompt_lens, steps, width = np.array([6, 3, 8]), 4, 8
    seqs = [rng.randint(0, 128, n + steps) for n in prompt_lens]
    full = np.zeros((3, width + steps), np.int32)
    for b, s in enumerate(seqs):
        full[b, : len(s)] = s
    reference = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, full))  # right padding never affects the past

    step = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))
    prompts = np.zeros((3, width), np.int32)
    for b, (n, s) in enumerate(zip(prompt_lens, seqs)):
        prompts[b, :n] = s[:n]
    logits, cache = step(model, prompts, init_cache(cfg, 3, 16))
    assert np.asarray(cache.lengths).tolist() == [width] * 3
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits)[b, :n], reference[b, :n], atol=1e-5, rtol=0)
    cache = cache.replace(lengths=jnp.asarray(prompt_lens, jnp.int32))  # the caller resets right-padded rows
    for t in range(steps):
        new = np.array([[s[n + t]] for n, s in zip(prompt_lens, seqs)], np.int32)
        logits, cache = step(model, new, cache)
        want = np.stack([reference[b, n + t] for b, n in enumerate(prompt_lens)])
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want, atol=1e-5, rtol=0)
    assert np.asarray(cache.lengths).tolist() == (prompt_lens + steps).tolist()
    with pytest.raises(ValueError, match="segment_ids cannot be combined with a KV cache"):
        model(prompts, segment_ids=np.ones_like(prompts), cache=cache)


def test_decode_step_reads_only_the_width_it_is_given():
    """A decode step reading only the first ``width`` cached positions gives the full read's logits to every row
    below the width (the engine picks the width from its running slots' lengths)."""
    cfg = ModelConfig(architecture="qwen2", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, max_position_embeddings=512)
    # XLA's attention (the CPU decode kernel reads each row up to its own position: width is moot there).
    weights = decode_weights(create_model(cfg, seed=4), cpu_kernel=False)
    rng = np.random.RandomState(3)
    cache = init_layer_cache(cfg, 3, 300, heads_first=True)
    cache = cache.replace(k=tuple(jnp.asarray(rng.randn(*c.shape), jnp.float32) for c in cache.k),
                          v=tuple(jnp.asarray(rng.randn(*c.shape), jnp.float32) for c in cache.v),
                          lengths=jnp.asarray([10, 100, 250], jnp.int32))
    tokens = jnp.asarray([5, 6, 7], jnp.int32)
    step = jax.jit(lambda c, w: decode_step(weights, cfg, tokens, c, width=w)[0], static_argnums=1)
    full = np.asarray(step(cache, None))
    for width, below in ((128, 2), (256, 3), (300, 3)):
        got = np.asarray(step(cache, width))
        np.testing.assert_allclose(got[:below], full[:below], atol=1e-5, rtol=0)
        if below < len(got):  # the width is not ignored: the rows past it differ
            assert not np.allclose(got[below:], full[below:], atol=1e-3)


@pytest.mark.parametrize("heads_first", [True, False])
def test_decode_step_equals_the_forward_in_both_layer_cache_layouts(heads_first):
    cfg = ModelConfig(architecture="qwen2", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, qkv_bias=True, max_position_embeddings=64)
    model = create_model(cfg, seed=3)
    rng = np.random.RandomState(1)
    seq = rng.randint(0, 128, (2, 7)).astype(np.int32)
    reference = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, seq))
    weights = decode_weights(model)
    cache = init_layer_cache(cfg, 2, 16, heads_first=heads_first)
    assert cache.heads_first == heads_first and cache.max_len == 16
    step = jax.jit(lambda w, t, c: decode_step(w, cfg, t, c))
    for t in range(seq.shape[1]):
        logits, cache = step(weights, jnp.asarray(seq[:, t]), cache)
        np.testing.assert_allclose(np.asarray(logits), reference[:, t], atol=1e-5, rtol=0)
