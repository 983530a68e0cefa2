"""Run an attention kernel under ``shard_map`` over batch and heads of the active mesh.

A ``pallas_call`` is opaque to XLA's SPMD partitioner (it would gather its operands onto every device), so
sharded code calls the kernels per shard: batch rows split over the batch mesh axes, heads over the head
axes. Axes whose size does not divide the dimension are dropped (that dimension is then replicated), and
heads are split only when both query and kv head counts divide, so every shard keeps whole GQA groups.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by ``jax.set_mesh`` (None when there is none or it has a single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) <= 1:
        return None
    return mesh


def _usable(mesh, axes: Sequence[str], size: int) -> tuple[str, ...] | None:
    """The longest prefix of ``axes`` (present in the mesh) whose product divides ``size``."""
    chosen: list[str] = []
    prod = 1
    for ax in axes:
        if ax not in mesh.shape:
            continue
        n = mesh.shape[ax]
        if n == 1:
            continue
        if size % (prod * n):
            break
        chosen.append(ax)
        prod *= n
    return tuple(chosen) or None


def shard_over_batch_and_heads(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array | None],
    layouts: Sequence[str | None],
    out_layout: str,
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axes: Sequence[str] = ("tensor",),
) -> jax.Array:
    """``fn(*args)`` per shard of the active mesh (or directly without one).

    ``layouts`` name each argument's dims with letters: ``b`` batch, ``h`` query heads, ``k`` kv heads,
    anything else replicated (e.g. ``"bshd"`` for q, ``"bskd"`` for k/v, ``"bs"`` for segment ids, ``"b"``
    for lengths); ``None`` entries pass through unsharded (e.g. absent segment ids).
    """
    mesh = active_mesh()
    if mesh is None:
        return fn(*args)
    b_axes = _usable(mesh, batch_axes, batch)
    h_axes = _usable(mesh, head_axes, math.gcd(q_heads, kv_heads))
    if b_axes is None and h_axes is None:
        return fn(*args)

    def spec(layout: str | None):
        if layout is None:
            return P()
        dims = {"b": b_axes, "h": h_axes, "k": h_axes}
        return P(*(dims.get(c) for c in layout))

    present = [i for i, a in enumerate(args) if a is not None]

    def local(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(spec(layouts[i]) for i in present),
        out_specs=spec(out_layout),
        check_vma=False,
    )
    return mapped(*(args[i] for i in present))
