"""A decode-step forward pass laid out for speed on CPU (one new token per row against the KV cache).

The model's own forward scans over *stacked* layer weights; on the CPU backend every ``lax.scan`` step
copies its weight slice (a dynamic slice feeding a matmul is materialised), the cached attention transposes
each layer's cache slice for its ``dot_general``, and the tied head multiplies by the transposed embedding.
For decoding that is ~25% of the step. ``DecodeWeights`` is the same weights rearranged once: per-layer
arrays (a Python-unrolled loop, static slices only), q/k/v and gate/up fused into one matmul each, and the
head as ``[hidden, vocab]``. Attention for one query token is two batched matmuls over the cache as stored.

Semantics are the model's (``Transformer.__call__`` with a cache and ``T = 1``): the same building blocks
(``rms_norm``, ``rope_cos_sin``, ``apply_rope``), GQA, q/k norm, qkv bias, sliding window; the tests compare
it with the model and with transformers. Costs one extra copy of the weights (CPU memory). For
``attention=pallas|cudnn`` the attention goes through the model's dispatch (``cached_attention``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ditto_jax.model.attention import cached_attention, resolve_impl
from ditto_jax.model.config import ModelConfig
from ditto_jax.model.layers import apply_rope, rms_norm, rope_cos_sin


@flax.struct.dataclass
class DecodeWeights:
    """The model's weights for decoding: ``layers`` a list of per-layer dicts, ``embed [V, H]``,
    ``head [H, V]``, ``norm [H]``."""

    layers: list[dict[str, jax.Array]]
    embed: jax.Array
    head: jax.Array
    norm: jax.Array


def decode_weights(model: Any) -> DecodeWeights:
    """Rearrange ``model``'s parameters (once, outside the decode loop); keeps each array's sharding family."""
    cfg: ModelConfig = model.cfg
    a, m, lyr = model.layers.self_attn, model.layers.mlp, model.layers

    params = {
        "ln1": lyr.input_layernorm.scale[...], "ln2": lyr.post_attention_layernorm.scale[...],
        "q": a.q_proj.kernel[...], "k": a.k_proj.kernel[...], "v": a.v_proj.kernel[...], "o": a.o_proj.kernel[...],
        "gate": m.gate_proj.kernel[...], "up": m.up_proj.kernel[...], "down": m.down_proj.kernel[...],
        "embed": model.embed_tokens[...], "norm": model.norm[...],
        "head": None if model.lm_head is None else model.lm_head[...],
    }
    if a.q_proj.bias is not None:
        params.update(qb=a.q_proj.bias[...], kb=a.k_proj.bias[...], vb=a.v_proj.bias[...])
    if a.q_norm is not None:
        params.update(qn=a.q_norm.scale[...], kn=a.k_norm.scale[...])
    return _relayout(params, num_layers=cfg.num_layers, dtype=cfg.compute_dtype)


@functools.partial(jax.jit, static_argnames=("num_layers", "dtype"))
def _relayout(params: dict[str, Any], *, num_layers: int, dtype: Any) -> DecodeWeights:
    """``DecodeWeights`` from the stacked parameters (module level: same-shaped models share its compilation)."""
    layers = []
    for i in range(num_layers):
        w = {
            "ln1": params["ln1"][i], "ln2": params["ln2"][i],
            "qkv": jnp.concatenate([params["q"][i], params["k"][i], params["v"][i]], axis=-1).astype(dtype),
            "o": params["o"][i].astype(dtype),
            "gate_up": jnp.concatenate([params["gate"][i], params["up"][i]], axis=-1).astype(dtype),
            "down": params["down"][i].astype(dtype),
        }
        if "qb" in params:
            w["qkv_bias"] = jnp.concatenate([params["qb"][i], params["kb"][i], params["vb"][i]], -1).astype(dtype)
        if "qn" in params:
            w["qn"], w["kn"] = params["qn"][i], params["kn"][i]
        layers.append(w)
    head = params["embed"].T if params["head"] is None else params["head"]
    return DecodeWeights(layers=layers, embed=params["embed"], head=head.astype(dtype), norm=params["norm"])


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: int | None) -> jax.Array:
    """q ``[B, Hq, D]`` (at position ``lengths[b]``) against k/v ``[B, S, Hkv, D]`` valid up to and including
    ``lengths[b]``; softmax in float32.

    Both products are plain batched matmuls over the cache *as stored* (``[B, S, Hkv*D]``, no transpose or
    copy of the cache): q enters as a block-diagonal ``[Hkv*D, Hkv*G]`` matrix and the output keeps the
    diagonal blocks. That spends ``Hkv`` times the attention FLOPs, which for decoding on CPU is far less
    than the matmuls of the layer (it is the CPU path; accelerators use the model's attention or the kernel).
    """
    b, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    hi = jax.lax.Precision.HIGHEST
    eye = jnp.eye(hkv, dtype=jnp.float32)
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32) * (1.0 / d**0.5)
    q_blocks = (qg[:, :, None, :, :] * eye[None, :, :, None, None]).transpose(0, 1, 4, 2, 3)  # [B, h, D, h', G]
    scores = jnp.matmul(k.reshape(b, s_len, hkv * d).astype(jnp.float32), q_blocks.reshape(b, hkv * d, hkv * g),
                        precision=hi)  # [B, S, Hkv*G]
    pos = jnp.arange(s_len, dtype=jnp.int32)[None, :]
    valid = pos <= lengths[:, None]
    if window is not None:
        valid &= pos > lengths[:, None] - window
    scores = jnp.where(valid[:, :, None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=1)
    o = jnp.matmul(jnp.swapaxes(p, 1, 2), v.reshape(b, s_len, hkv * d).astype(jnp.float32), precision=hi)
    o = jnp.sum(o.reshape(b, hkv, g, hkv, d) * eye[None, :, None, :, None], axis=3)  # diagonal blocks
    return o.reshape(b, hq, d).astype(q.dtype)


def decode_step(w: DecodeWeights, cfg: ModelConfig, tokens: jax.Array, k_layers: tuple[jax.Array, ...],
                v_layers: tuple[jax.Array, ...], lengths: jax.Array) -> tuple[jax.Array, tuple, tuple]:
    """Feed ``tokens [B]`` at positions ``lengths [B]``; returns ``(logits [B, V] float32, k_layers, v_layers)``
    with the new keys/values written into the per-layer caches ``[B, S, Hkv, D]`` (in place inside jit)."""
    dt = cfg.compute_dtype
    b = tokens.shape[0]
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    impl = resolve_impl(cfg.attention)
    x = jnp.take(w.embed, tokens, axis=0).astype(dt)
    cos, sin = rope_cos_sin(lengths[:, None], cfg)
    rows = jnp.arange(b, dtype=jnp.int32)
    k_out, v_out = [], []
    for i, lw in enumerate(w.layers):
        h = rms_norm(x, lw["ln1"], cfg.rms_norm_eps)
        qkv = h @ lw["qkv"]
        if "qkv_bias" in lw:
            qkv = qkv + lw["qkv_bias"]
        q = qkv[:, :hq * d].reshape(b, 1, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].reshape(b, 1, hkv, d)
        v = qkv[:, (hq + hkv) * d:].reshape(b, hkv, d)
        if "qn" in lw:
            q, k = rms_norm(q, lw["qn"], cfg.rms_norm_eps), rms_norm(k, lw["kn"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)[:, 0]
        kc = k_layers[i].at[rows, lengths].set(k.astype(k_layers[i].dtype), mode="drop")
        vc = v_layers[i].at[rows, lengths].set(v.astype(v_layers[i].dtype), mode="drop")
        k_out.append(kc)
        v_out.append(vc)
        if impl == "xla":
            o = _attend_one(q[:, 0], kc, vc, lengths, cfg.sliding_window)
        else:
            o = cached_attention(q, kc, vc, q_offset=lengths, impl=cfg.attention,
                                 sliding_window=cfg.sliding_window)[:, 0]
        x = x + o.reshape(b, hq * d).astype(dt) @ lw["o"]
        h = rms_norm(x, lw["ln2"], cfg.rms_norm_eps)
        gu = h @ lw["gate_up"]
        f = gu.shape[-1] // 2
        x = x + (jax.nn.silu(gu[:, :f]) * gu[:, f:]) @ lw["down"]
    x = rms_norm(x, w.norm, cfg.rms_norm_eps)
    logits = jnp.matmul(x, w.head, preferred_element_type=jnp.float32)
    return logits, tuple(k_out), tuple(v_out)
