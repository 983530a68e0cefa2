"""``scan_layers: false`` (and the CPU kernel path, which loops over the layers in Python) equals the scanned
model, logits and gradients; its gradient gathers the per-layer weight gradients with one concatenation per
stacked weight, not one zero-padded full stack per layer (30 of them made SmolLM2's train step 13 GB of
temporaries and 3x slower)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditto_jax.model import create_model, load_model_config


def _loss_and_grads(model, tokens):
    def loss(m):
        return jnp.mean(m(tokens) ** 2)

    return jax.jit(lambda m: nnx.value_and_grad(loss)(m))(model)


def test_the_layer_loop_equals_the_scan():
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 512)
    cfg_scan = load_model_config("model/tiny", [])
    cfg_loop = load_model_config("model/tiny", ["scan_layers=false"])
    assert cfg_scan.num_layers >= 2
    value_ref, g_ref = _loss_and_grads(create_model(cfg_scan, seed=3), tokens)
    value, g = _loss_and_grads(create_model(cfg_loop, seed=3), tokens)
    assert abs(float(value) - float(value_ref)) <= 1e-6 * abs(float(value_ref))
    leaves_ref, leaves = jax.tree.leaves(nnx.state(g_ref)), jax.tree.leaves(nnx.state(g))
    assert len(leaves) == len(leaves_ref) > 0
    for a, b in zip(leaves_ref, leaves):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def _equations(jaxpr) -> list:
    """Every equation of ``jaxpr`` and of the jaxprs inside its equations (jit, custom_vjp, remat, ...)."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr holds a Jaxpr
            if hasattr(inner, "eqns"):
                found += _equations(inner)
    return found


def test_the_layer_loop_gradient_is_linear_in_the_depth():
    cfg = load_model_config("model/tiny", ["scan_layers=false", "num_layers=4"])
    model = create_model(cfg, seed=1)
    tokens = jnp.zeros((1, 8), jnp.int32)
    graphdef, state = nnx.split(model)
    stacked = [x for x in jax.tree.leaves(state) if x.ndim >= 1 and x.shape[0] == cfg.num_layers]
    assert stacked

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)

    eqns = _equations(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    layer_shapes = {tuple(x.shape) for x in stacked}
    pads = [e for e in eqns if e.primitive.name == "pad" and tuple(e.outvars[0].aval.shape) in layer_shapes]
    joins = [e for e in eqns if e.primitive.name == "concatenate" and tuple(e.outvars[0].aval.shape) in layer_shapes]
    assert not pads  # a slice a layer: one zero-padded [L, ...] gradient a layer
    assert len(joins) == len(stacked)
