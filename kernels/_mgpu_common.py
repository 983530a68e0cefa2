"""Helpers shared by the Mosaic GPU forward and backward kernels (jax-version differences)."""

from __future__ import annotations

from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_params():
    """``InterpretGPUParams()`` across jax versions (exported publicly from 0.11)."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # noqa: PLC0415 (jax < 0.11)
    return cls()


def transposed(ref):
    """Transposed view of a 2-D shared-memory ref (``ref.transpose`` on new jax, ``transpose_ref`` on old)."""
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))
