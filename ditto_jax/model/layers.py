"""Building blocks: stacked (per-layer) parameters, RMSNorm, rotary embeddings, the products."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.model.config import ModelConfig, RopeScaling


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: jnp.dtype,
          init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter with logical axis names in its ``axes`` metadata (``ditto_jax.mesh`` maps them to devices)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), axes=axes)


class StackedLinear(nnx.Module):
    """``num_layers`` dense layers stored as one ``kernel [L, in, out]`` (+ ``bias [L, out]``)."""

    def __init__(self, layers: int, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool,
                 dtype: jnp.dtype, std: float, rngs: nnx.Rngs):
        self.kernel = param(rngs, (layers, d_in, d_out), ("layers", *axes), dtype, std=std)
        self.bias = param(rngs, (layers, d_out), ("layers", axes[1]), dtype, init="zeros") if bias else None


class StackedNorm(nnx.Module):
    """``num_layers`` RMSNorm scales stored as one ``scale [L, dim]``."""

    def __init__(self, layers: int, dim: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (layers, dim), ("layers", "norm"), dtype, init="ones")


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Hugging Face computes it: normalise in float32, cast back, then multiply by the scale."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jnp.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` including ``llama3`` / ``linear`` scaling (as in transformers)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, head_dim]`` in the rotate-half layout (frequencies concatenated twice)."""
    inv = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by position (Hugging Face rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, w: jax.Array, cpu_kernel: bool = False) -> jax.Array:
    """``x [..., D] @ w [D, F]``, whose weight gradient contracts the activations first.

    The same product and gradients as ``x @ w``; only the backward's operand order differs. Autodiff's
    ``dot_general`` transpose makes XLA's CPU backend transpose the whole output gradient ``[..., F]`` before the
    weight-gradient dot; ``einsum("...d,...f->df", x, g)`` does not (40M model, ``[8, 512, 512] @ [512, 2816]``,
    2-core CPU: the vjp in 128 ms instead of 204 ms).

    ``cpu_kernel``: the caller vouches for one CPU device; float32 products (forward and both gradients) then run
    ``kernels.cpu.matmul`` when it is available, which reads the transposed operands in place."""
    return _linear_fwd(x, w, cpu_kernel)[0]


def _linear_fwd(x, w, cpu_kernel):
    y = cpu_kernels.matmul_rows(x, w) if cpu_kernels.matmul_serves(cpu_kernel, x, w) else x @ w
    return y, (x, w)


def _linear_bwd(cpu_kernel, res, g):
    x, w = res
    if cpu_kernels.matmul_serves(cpu_kernel, x, w, g):
        return cpu_kernels.matmul_rows(g, w, trans_b=True), cpu_kernels.matmul_rows(x, g, trans_a=True)
    return (jnp.einsum("...f,df->...d", g, w).astype(x.dtype),
            jnp.einsum("...d,...f->df", x, g).astype(w.dtype))


linear.defvjp(_linear_fwd, _linear_bwd)


class LayerSlice(NamedTuple):
    """Matrix ``index`` (an int32 scalar, traced inside a layer scan) of a stacked ``[L, K, N]`` weight."""

    stacked: jax.Array
    index: jax.Array


def project(x: jax.Array, w: jax.Array | LayerSlice, cpu_kernel: bool = False) -> jax.Array:
    """``x [..., K] @ w`` without a custom gradient (the cached forward's products), ``w`` a matrix or a
    ``LayerSlice``. ``cpu_kernel`` (see ``linear``): float32 products run ``kernels.cpu.matmul``, which reads a
    ``LayerSlice`` in place; elsewhere the slice is taken (inside a scan, a copy of the layer's matrix a call)."""
    layer = None
    if isinstance(w, LayerSlice):
        w, layer = w.stacked, w.index
    if cpu_kernels.matmul_serves(cpu_kernel, x, w):
        return cpu_kernels.matmul_rows(x, w, layer=layer)
    return x @ (w if layer is None else w[layer]).astype(x.dtype)


def head_logits(hidden: jax.Array, w: jax.Array, vocab_major: bool, cpu_kernel: bool = False) -> jax.Array:
    """Float32 logits ``[..., V]`` of ``hidden [..., H]`` against the head ``w`` (``[V, H]`` when ``vocab_major``, the
    tied embedding; else ``[H, V]``), of the caller's dtype. ``cpu_kernel``: see ``linear``."""
    if cpu_kernels.matmul_serves(cpu_kernel, hidden, w):
        return cpu_kernels.matmul_rows(hidden, w, trans_b=vocab_major)
    spec = "...h,vh->...v" if vocab_major else "...h,hv->...v"
    return jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)


def decode_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a ``DecodeWeights`` matrix: a packed ``[N/32, K, 32]`` weight or a ``QuantWeight`` (CPU,
    float32; see ``kernels.cpu``) runs the few-row kernel, a ``[K, N]`` one XLA's dot."""
    return cpu_kernels.small_matmul(x, w) if cpu_kernels.is_packed(w) else x @ w
