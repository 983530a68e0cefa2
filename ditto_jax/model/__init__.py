"""The decoder model: config, layers, attention dispatch, KV caches, creation (directly sharded).

The one forward pass: ``Transformer.__call__`` (training, scoring, prefill; with a ``KVCache`` it appends
tokens to the cache) and ``decode_step`` (one token per row over ``DecodeWeights`` and a ``LayerCache``, the
same layer functions); sampling uses only this public API."""

from __future__ import annotations

import json
import threading
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ditto_jax.mesh import param_shardings
from ditto_jax.model.cache import KVCache, LayerCache, init_cache, init_layer_cache
from ditto_jax.model.config import ModelConfig, RopeScaling, load_model_config
from ditto_jax.model.transformer import (
    DecodeWeights,
    Transformer,
    decode_matmul_kind,
    decode_step,
    decode_weights,
    set_decode_source,
)
from ditto_jax.model.xla_attention import read_widths


def create_model(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 rules: dict | None = None) -> Transformer:
    """A randomly initialised model; with a mesh every parameter is created directly in its sharding (by one
    jitted initialiser per config, mesh and rules, compiled once and reused for every seed)."""
    if mesh is None:
        return Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, make = _sharded_initializer(cfg, mesh, rules)
    with jax.set_mesh(mesh):
        state = make(jnp.int32(seed))
    return nnx.merge(graphdef, state)


_INITIALIZERS: dict[tuple, tuple[nnx.GraphDef, Callable]] = {}
_INITIALIZERS_LOCK = threading.Lock()
_MAX_INITIALIZERS = 8


def _sharded_initializer(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: dict | None
                         ) -> tuple[nnx.GraphDef, Callable]:
    """``(graphdef, jitted seed -> sharded state)``; the seed is an argument, so a new seed compiles nothing."""
    key = (cfg.model_dump_json(), mesh, json.dumps(rules, sort_keys=True, default=str))
    with _INITIALIZERS_LOCK:
        if key not in _INITIALIZERS:
            graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
            shardings = param_shardings(abs_state, mesh, rules)
            make = jax.jit(lambda seed: nnx.state(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed)))),
                           out_shardings=shardings)
            if len(_INITIALIZERS) >= _MAX_INITIALIZERS:  # oldest first (dicts keep insertion order)
                del _INITIALIZERS[next(iter(_INITIALIZERS))]
            _INITIALIZERS[key] = (graphdef, make)
        return _INITIALIZERS[key]


__all__ = ["DecodeWeights", "KVCache", "LayerCache", "ModelConfig", "RopeScaling", "Transformer", "create_model",
           "decode_matmul_kind", "decode_step", "decode_weights", "set_decode_source", "init_cache", "init_layer_cache",
           "load_model_config", "read_widths"]
