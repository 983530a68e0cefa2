"""The decoder model: config, layers, attention dispatch, KV cache, creation (directly sharded)."""

from __future__ import annotations

import jax
from flax import nnx

from ditto_jax.mesh import param_shardings
from ditto_jax.model.cache import KVCache, init_cache
from ditto_jax.model.config import ModelConfig, RopeScaling, load_model_config
from ditto_jax.model.transformer import Transformer


def create_model(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 rules: dict | None = None) -> Transformer:
    """A randomly initialised model; with a mesh every parameter is created directly in its sharding."""
    if mesh is None:
        return Transformer(cfg, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh, rules)
    make = jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))), out_shardings=shardings)
    with jax.set_mesh(mesh):
        state = make()
    return nnx.merge(graphdef, state)


__all__ = ["KVCache", "ModelConfig", "RopeScaling", "Transformer", "create_model", "init_cache", "load_model_config"]
