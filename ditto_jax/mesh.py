"""Device mesh from config and logical-axis rules mapping parameter/activation dims to mesh axes.

Axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded), ``tensor`` (heads and
MLP split). A logical dimension whose size is not divisible by its mesh axes is replicated instead, and
``param_shardings`` reports exactly what each parameter gets (tests compare it with the rules).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import pydantic
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ditto_jax.config import StrictModel

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (in order); None replicates.
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "seq": None,
    "cache_heads": ("tensor",),
}


class MeshConfig(StrictModel):
    """Mesh shape; ``-1`` on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, list[str] | None] = pydantic.Field(default_factory=dict)

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Resolve ``-1`` and check the product equals ``num_devices``."""
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ValueError("mesh: at most one axis may be -1")
        known = math.prod(d for d in dims if d != -1)
        if any(d == 0 or d < -1 for d in dims):
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {dims}")
        if -1 in dims:
            if num_devices % known:
                raise ValueError(f"mesh: {num_devices} devices not divisible by {known}")
            dims[dims.index(-1)] = num_devices // known
        if math.prod(dims) != num_devices:
            raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(dims)} but {num_devices} devices are available")
        return tuple(dims)  # type: ignore[return-value]

    def logical_rules(self) -> dict[str, tuple[str, ...] | None]:
        """Default rules updated with the config's overrides."""
        rules = dict(DEFAULT_RULES)
        for k, v in self.rules.items():
            rules[k] = tuple(v) if v else None
        return rules


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all), with Auto axis types."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = cfg.shape(len(devices))
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...] | None] | None = None) -> PartitionSpec:
    """PartitionSpec for a value with logical ``axes``; mesh axes of size 1, reused or not dividing are dropped."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(axes):
        mesh_axes = rules.get(name) if name is not None else None
        chosen: list[str] = []
        size = 1
        for ax in mesh_axes or ():
            n = mesh.shape[ax]
            if ax in used or n == 1:
                continue
            if shape is not None and shape[i] % (size * n):
                continue
            chosen.append(ax)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(state: Any, mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None] | None = None) -> Any:
    """NamedSharding for every ``nnx.Param`` in ``state`` (from its ``axes`` metadata); other leaves replicated."""

    def one(v: Any) -> Any:
        axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        if axes is None:
            spec = PartitionSpec()
        else:
            spec = logical_to_spec(axes, value.shape, mesh, rules)
        sharding = NamedSharding(mesh, spec)
        return v.replace(sharding) if isinstance(v, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, tuple[str, ...] | None] | None = None) -> NamedSharding:
    """Sharding for a ``[batch, ...]`` input: batch over the data axes, the rest replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh, rules)
    return NamedSharding(mesh, spec)
