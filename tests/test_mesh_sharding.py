"""Sharding on 8 simulated CPU devices: logits equal single-device logits; every parameter sharded by the rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import forward, make_hf_model, save_hf, token_batch
from jax.sharding import NamedSharding, PartitionSpec

from ditto_jax import hf
from ditto_jax.mesh import MeshConfig, batch_sharding, logical_to_spec, make_mesh
from ditto_jax.model import create_model, load_model_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
# What DEFAULT_RULES say, written out per parameter (mesh axes per dimension; "layers"/"norm" stay replicated).
EXPECTED = {
    "embed_tokens": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "norm": (None,),
    "layers.input_layernorm.scale": (None, None),
    "layers.post_attention_layernorm.scale": (None, None),
    "layers.self_attn.q_proj.kernel": (None, "fsdp", "tensor"),
    "layers.self_attn.k_proj.kernel": (None, "fsdp", "tensor"),
    "layers.self_attn.v_proj.kernel": (None, "fsdp", "tensor"),
    "layers.self_attn.q_proj.bias": (None, "tensor"),
    "layers.self_attn.k_proj.bias": (None, "tensor"),
    "layers.self_attn.v_proj.bias": (None, "tensor"),
    "layers.self_attn.o_proj.kernel": (None, "tensor", "fsdp"),
    "layers.mlp.gate_proj.kernel": (None, "fsdp", "tensor"),
    "layers.mlp.up_proj.kernel": (None, "fsdp", "tensor"),
    "layers.mlp.down_proj.kernel": (None, "tensor", "fsdp"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Qwen2-family checkpoint whose every dimension divides 8 (so each rule actually shards)."""
    model = make_hf_model("qwen2", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128)
    path = save_hf(model, tmp_path_factory.mktemp("mesh") / "qwen2")
    single, _ = hf.load_pretrained(path)
    ids = token_batch(8, 10)
    return path, ids, forward(single, ids)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_equal_single_device_and_params_follow_rules(checkpoint, shape):
    path, ids, reference = checkpoint
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    model, _ = hf.load_pretrained(path, mesh=mesh)
    params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(params) == set(EXPECTED)
    for key, axes in EXPECTED.items():
        spec = PartitionSpec(*[ax if ax is not None and mesh.shape[ax] > 1 else None for ax in axes])
        got = params[key].sharding
        assert got.is_equivalent_to(NamedSharding(mesh, spec), params[key].ndim), (key, got.spec, spec)
    sharded_ids = jax.device_put(ids, batch_sharding(mesh))
    out = np.asarray(forward(model, sharded_ids))
    assert np.abs(out - reference).max() <= 1e-5


def test_create_model_is_directly_sharded():
    cfg = load_model_config("model/tiny")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = create_model(cfg, mesh=mesh)
    kernel = model.layers.mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (2, 32, 64)


def test_sharded_create_model_compiles_once_per_config_and_mesh():
    from jax import monitoring

    cfg = load_model_config("model/tiny")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    first = create_model(cfg, mesh=mesh, seed=1)
    compiles: list[str] = []
    listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    monitoring.register_event_duration_secs_listener(listener)
    try:
        second = create_model(cfg, mesh=mesh, seed=2)
        again = create_model(cfg.model_copy(), mesh=mesh, seed=1)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    leaves = [jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (first, second, again)]
    assert all(np.array_equal(a, c) and a.sharding == c.sharding for a, c in zip(leaves[0], leaves[2]))
    assert not np.array_equal(leaves[0][0], leaves[1][0])  # the seed is an argument, not a baked-in constant
    eager = jax.tree.leaves(nnx.state(create_model(cfg, seed=1), nnx.Param))
    assert all(np.allclose(a, e, rtol=1e-6, atol=1e-7) for a, e in zip(leaves[0], eager))


def test_logical_rules_drop_axes_that_do_not_divide_or_are_reused():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    assert logical_to_spec(("layers", "embed", "kv_heads"), (2, 64, 6), mesh) == PartitionSpec(None, "fsdp")
    assert logical_to_spec(("batch", None), (8, 3), mesh) == PartitionSpec("fsdp")
    assert logical_to_spec(("vocab", "vocab"), (8, 8), mesh) == PartitionSpec("tensor")


def test_mesh_config_shapes_and_errors():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2)
    for bad in (MeshConfig(data=-1, fsdp=-1), MeshConfig(data=3, fsdp=1, tensor=1), MeshConfig(data=-1, tensor=3)):
        with pytest.raises(ValueError, match="mesh"):
            bad.shape(8)
