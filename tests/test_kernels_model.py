"""The model with ``attention: pallas`` (interpreted kernels on CPU) equals ``attention: xla``: logits and
gradients with packed segments, a cached decode step, and sharded under a data x tensor mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditto_jax.mesh import MeshConfig, make_mesh
from ditto_jax.model import create_model, init_cache, load_model_config
from ditto_jax.model.attention import cached_attention, full_attention


def _config(attention: str):
    return load_model_config("model/tiny", [f"attention={attention}"])


def _logits_loss_and_grads(model, tokens, segment_ids):
    def loss(m):
        logits = m(tokens, segment_ids=segment_ids)
        return jnp.mean(logits**2), logits

    (value, logits), grads = jax.jit(lambda m: nnx.value_and_grad(loss, has_aux=True)(m))(model)
    return logits, value, grads


def test_pallas_model_matches_xla_logits_and_grads():
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 512)
    segment_ids = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24], jnp.int32)
    logits_ref, l_ref, g_ref = _logits_loss_and_grads(create_model(_config("xla"), seed=3), tokens, segment_ids)
    logits, l_pal, g_pal = _logits_loss_and_grads(create_model(_config("pallas"), seed=3), tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), rtol=1e-5, atol=1e-5)
    assert abs(float(l_ref) - float(l_pal)) <= 1e-5 * abs(float(l_ref)) + 1e-9
    leaves_ref, leaves_pal = jax.tree.leaves(nnx.state(g_ref)), jax.tree.leaves(nnx.state(g_pal))
    assert len(leaves_ref) == len(leaves_pal) > 0
    for a, b in zip(map(np.asarray, leaves_ref), map(np.asarray, leaves_pal)):
        scale = float(np.max(np.abs(a))) + 1e-12
        assert float(np.max(np.abs(a - b))) / scale <= 1e-4


def test_pallas_decode_step_matches_xla():
    cfg_ref, cfg_pal = _config("xla"), _config("pallas")
    model_ref, model_pal = create_model(cfg_ref, seed=1), create_model(cfg_pal, seed=1)
    prompt = jax.random.randint(jax.random.key(2), (2, 7), 0, 512)
    cache = init_cache(cfg_ref, 2, 32)
    forward = jax.jit(lambda m, t, c: m(t, cache=c))
    _, cache = forward(model_ref, prompt, cache)
    nxt = jnp.asarray([[5], [9]], jnp.int32)
    out_ref, _ = forward(model_ref, nxt, cache)
    out_pal, _ = forward(model_pal, nxt, cache)
    np.testing.assert_allclose(np.asarray(out_pal), np.asarray(out_ref), rtol=1e-5, atol=1e-5)


def test_sharded_dispatch_runs_kernels_per_shard():
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    ks = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(ks[0], (4, 16, 4, 16))
    k = jax.random.normal(ks[1], (4, 16, 2, 16))
    v = jax.random.normal(ks[2], (4, 16, 2, 16))
    seg = jnp.asarray([[1] * 8 + [2] * 8] * 4, jnp.int32)
    ref = jax.jit(lambda q, k, v, s: full_attention(q, k, v, impl="xla", segment_ids=s))(q, k, v, seg)
    with jax.set_mesh(mesh):
        lowered = jax.jit(lambda q, k, v, s: full_attention(q, k, v, impl="pallas", segment_ids=s)).lower(q, k, v, seg)
        text = lowered.as_text()
        out = lowered.compile()(q, k, v, seg)
        dec = jax.jit(lambda q, k, v, off: cached_attention(q, k, v, q_offset=off, impl="pallas"))(
            q[:, :1], k, v, jnp.asarray([3, 7, 15, 0], jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert "shard_map" in text or "sdy.manual_computation" in text
    dec_ref = jax.jit(lambda q, k, v, off: cached_attention(q, k, v, q_offset=off, impl="xla"))(
        q[:, :1], k, v, jnp.asarray([3, 7, 15, 0], jnp.int32))
    np.testing.assert_allclose(np.asarray(dec), np.asarray(dec_ref), rtol=1e-5, atol=1e-5)
