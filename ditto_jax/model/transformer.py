"""The decoder: one flax.nnx module for Llama / Qwen2 / Qwen3 / Mistral, layers stacked and scanned.

Parameter names mirror Hugging Face (``embed_tokens``, ``layers.self_attn.q_proj``, ``layers.mlp.gate_proj``,
``norm``, ``lm_head``) so the import table is nearly the identity; every per-layer weight carries a leading
``[num_layers]`` axis and the forward pass is one ``lax.scan`` (compile time flat in depth).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.model.attention import cached_attention, full_attention, write_and_attend
from ditto_jax.model.cache import KVCache, LayerCache
from ditto_jax.model.config import ModelConfig
from ditto_jax.model.layers import (
    LayerSlice,
    StackedLinear,
    StackedNorm,
    apply_rope,
    decode_matmul,
    head_logits,
    linear,
    param,
    project,
    rms_norm,
    rope_cos_sin,
)

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Attention(nnx.Module):
    """Stacked q/k/v/o projections (+ optional qkv bias and Qwen3 q/k RMSNorm)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, h, d, std, dt = cfg.num_layers, cfg.hidden_size, cfg.dim_per_head, cfg.initializer_range, cfg.weight_dtype
        self.q_proj = StackedLinear(L, h, cfg.num_heads * d, ("embed", "q_heads"), bias=cfg.qkv_bias, dtype=dt, std=std, rngs=rngs)
        self.k_proj = StackedLinear(L, h, cfg.num_kv_heads * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dt, std=std, rngs=rngs)
        self.v_proj = StackedLinear(L, h, cfg.num_kv_heads * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dt, std=std, rngs=rngs)
        self.o_proj = StackedLinear(L, cfg.num_heads * d, h, ("q_heads", "embed"), bias=False, dtype=dt, std=std, rngs=rngs)
        self.q_norm = StackedNorm(L, d, dt, rngs) if cfg.qk_norm else None
        self.k_norm = StackedNorm(L, d, dt, rngs) if cfg.qk_norm else None


class MLP(nnx.Module):
    """Stacked SwiGLU projections."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, h, f, std, dt = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range, cfg.weight_dtype
        self.gate_proj = StackedLinear(L, h, f, ("embed", "mlp"), bias=False, dtype=dt, std=std, rngs=rngs)
        self.up_proj = StackedLinear(L, h, f, ("embed", "mlp"), bias=False, dtype=dt, std=std, rngs=rngs)
        self.down_proj = StackedLinear(L, f, h, ("mlp", "embed"), bias=False, dtype=dt, std=std, rngs=rngs)


class DecoderLayers(nnx.Module):
    """All decoder layers, each weight stacked over a leading layer axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = cfg.weight_dtype
        self.input_layernorm = StackedNorm(cfg.num_layers, cfg.hidden_size, dt, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = StackedNorm(cfg.num_layers, cfg.hidden_size, dt, rngs)
        self.mlp = MLP(cfg, rngs)


# the per-layer matrices of ``_layer_weights`` (the rest are vectors: norm scales, biases)
LAYER_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def _layer_weights(layers: DecoderLayers) -> dict[str, Any]:
    """The stacked arrays of all layers as a plain pytree (what ``lax.scan`` slices)."""
    a, m = layers.self_attn, layers.mlp
    w: dict[str, Any] = {
        "ln1": layers.input_layernorm.scale[...], "ln2": layers.post_attention_layernorm.scale[...],
        "q": a.q_proj.kernel[...], "k": a.k_proj.kernel[...], "v": a.v_proj.kernel[...], "o": a.o_proj.kernel[...],
        "gate": m.gate_proj.kernel[...], "up": m.up_proj.kernel[...], "down": m.down_proj.kernel[...],
    }
    if a.q_proj.bias is not None:
        w.update(qb=a.q_proj.bias[...], kb=a.k_proj.bias[...], vb=a.v_proj.bias[...])
    if a.q_norm is not None:
        w.update(qn=a.q_norm.scale[...], kn=a.k_norm.scale[...])
    return w


class Transformer(nnx.Module):
    """Decoder-only language model. ``model(input_ids)`` returns float32 logits ``[B, T, vocab]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.weight_dtype
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, std=cfg.initializer_range)
        self.layers = DecoderLayers(cfg, rngs)
        self.norm = param(rngs, (cfg.hidden_size,), ("norm",), dt, init="ones")
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt, std=cfg.initializer_range)
        )

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 return_hidden: bool = False, cpu_kernel: bool = False) -> Any:
        """Run the decoder.

        Args:
          input_ids: int32 ``[B, T]``.
          positions: int32 ``[B, T]`` RoPE positions (default ``arange(T)``, or ``cache.lengths + arange(T)``).
          segment_ids: int32 ``[B, T]`` for packed sequences (attention never crosses a segment).
          cache: a ``KVCache``; the new tokens are written at ``cache.lengths`` and attend to the cache.
          return_hidden: return the final normalised hidden states instead of logits.
          cpu_kernel: the caller vouches for one CPU device and ``kernels.cpu.available()``: the attention over
            a float32 cache runs ``kernels.cpu.chunk_attention`` (see ``cached_attention``), a full pass's
            attention ``kernels.cpu.causal_attention`` (see ``full_attention``), the float32 projections and
            the head run ``kernels.cpu.matmul`` (``layers.linear``), and a full pass loops over the layers in
            Python instead of scanning them (a scan stacks every layer's saved activations into ``[L, ...]``
            buffers: train step on a 2-core CPU, 40M model B8 S512 5.53 -> 5.04 s, SmolLM2-135M B2 S512 6.08 ->
            5.51 s, 2026-12-07).

        Returns:
          logits ``[B, T, vocab]`` (float32), or ``(logits, new_cache)`` when a cache is given.
        """
        cfg = self.cfg
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a KV cache (packed rows are for full passes)")
        b, t = input_ids.shape
        if positions is None:
            base = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
            positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cfg.compute_dtype)
        cos, sin = rope_cos_sin(positions, cfg)
        weights = _layer_weights(self.layers)

        if cache is None:
            def body(h, w):
                return _decoder_layer(h, w, cfg, cos, sin, segment_ids=segment_ids, cpu_kernel=cpu_kernel), None

            body = _maybe_remat(body, cfg.remat)
            x, _ = _scan_or_loop(body, x, weights, cfg, unroll=cpu_kernel)
            new_cache = None
        else:
            # The whole cache rides in the carry and is updated by scatter: in place inside jit, no per-layer copy.
            # With the CPU kernels the layer matrices stay out of the scanned inputs: each product reads its
            # layer of the stack in place (a scan copies every slice it hands the body: SmolLM2-135M ~0.4 GB a call).
            stacked = {n: weights.pop(n) for n in LAYER_MATRICES} if cpu_kernel else {}

            def body(carry, w_and_idx):
                h, k_all, v_all = carry
                w, idx = w_and_idx
                w = w | {n: LayerSlice(a, idx) for n, a in stacked.items()}
                h, k_all, v_all = _decoder_layer_cached(h, w, idx, cfg, cos, sin, k_all, v_all, cache.lengths,
                                                        cpu_kernel)
                return (h, k_all, v_all), None

            idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, k_all, v_all), _ = _scan_or_loop(body, (x, cache.k, cache.v), (weights, idx), cfg)
            new_cache = KVCache(k=k_all, v=v_all, lengths=cache.lengths + t)

        x = rms_norm(x, self.norm[...], cfg.rms_norm_eps)
        out = x if return_hidden else self.logits(x, cpu_kernel)
        return out if new_cache is None else (out, new_cache)

    def logits(self, hidden: jax.Array, cpu_kernel: bool = False) -> jax.Array:
        """Project final hidden states ``[..., H]`` to float32 logits ``[..., vocab]`` (``cpu_kernel``: see
        ``__call__``)."""
        tied = self.lm_head is None
        w = (self.embed_tokens if tied else self.lm_head)[...].astype(self.cfg.compute_dtype)
        return head_logits(hidden, w, tied, cpu_kernel)


def _scan_or_loop(body, carry, xs, cfg: ModelConfig, unroll: bool = False):
    if cfg.scan_layers and not unroll:
        return jax.lax.scan(body, carry, xs)
    # One split of each stacked array, not a slice a layer: a slice's gradient is a zero-padded full stack, so L
    # slices made L full-size gradient stacks to sum (SmolLM2, 30 layers: 13 GB of temporaries a step); the
    # split's gradient is one concatenation.
    n = cfg.num_layers
    leaves, tree = jax.tree.flatten(xs)
    parts = [[p.reshape(a.shape[1:]) for p in jax.lax.split(a, [1] * n)] for a in leaves]
    for i in range(n):
        carry, _ = body(carry, jax.tree.unflatten(tree, [layers[i] for layers in parts]))
    return carry, None


def _maybe_remat(fn, policy: str):
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def _qkv(x: jax.Array, w: dict[str, Any], cfg: ModelConfig, cos: jax.Array, sin: jax.Array, fuse: bool = True,
         cpu_kernel: bool = False):
    """Normed, projected, rotated ``q, k, v``; ``fuse=False`` never concatenates the projections (see ``_finish``)."""
    dt = cfg.compute_dtype
    b, t, _ = x.shape
    d = cfg.dim_per_head
    h = rms_norm(x, w["ln1"], cfg.rms_norm_eps)
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    if "qkv" in w:  # DecodeWeights: fused once, outside the step
        qkv = decode_matmul(h, w["qkv"])
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"]
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
    elif fuse and _fuse_projections():
        qkv = linear(h, jnp.concatenate([w["q"], w["k"], w["v"]], axis=-1).astype(dt), cpu_kernel)
        if "qb" in w:
            qkv = qkv + jnp.concatenate([w["qb"], w["kb"], w["vb"]], axis=-1).astype(dt)
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
    else:  # the cached forward (no gradient: its products may run the CPU kernel), or an accelerator
        q, k, v = (project(h, w[n], cpu_kernel and not fuse) for n in ("q", "k", "v"))
        if "qb" in w:
            q, k, v = q + w["qb"].astype(dt), k + w["kb"].astype(dt), v + w["vb"].astype(dt)
    q = q.reshape(b, t, cfg.num_heads, d)
    k = k.reshape(b, t, cfg.num_kv_heads, d)
    v = v.reshape(b, t, cfg.num_kv_heads, d)
    if "qn" in w:
        q, k = rms_norm(q, w["qn"], cfg.rms_norm_eps), rms_norm(k, w["kn"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _finish(x: jax.Array, attn: jax.Array, w: dict[str, Any], cfg: ModelConfig, fuse: bool = True,
            cpu_kernel: bool = False) -> jax.Array:
    """Attention output projection and MLP with their residuals. ``fuse=False`` (the cached forward: no gradient)
    never concatenates gate/up (nor ``_qkv``'s q/k/v): the fused product pays for training, where its input gradient
    is one matmul, but in a prompt phase the per-call concatenation of the weights cost more than it saved
    (SmolLM2-135M, 2-core CPU: prefix fill 3.4 -> 3.1 s, prefill 2.3 -> 2.0 s of the real workload)."""
    dt = cfg.compute_dtype
    b, t = x.shape[:2]
    if "gate_up" in w:  # DecodeWeights
        x = x + decode_matmul(attn.reshape(b, t, -1), w["o"])
        h = rms_norm(x, w["ln2"], cfg.rms_norm_eps)
        gate_up = decode_matmul(h, w["gate_up"])
        f = gate_up.shape[-1] // 2
        return x + decode_matmul(jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:], w["down"])
    attn = attn.reshape(b, t, -1)
    if fuse and _fuse_projections():
        x = x + linear(attn, w["o"].astype(dt), cpu_kernel)
        h = rms_norm(x, w["ln2"], cfg.rms_norm_eps)
        f = w["gate"].shape[-1]
        gate_up = linear(h, jnp.concatenate([w["gate"], w["up"]], axis=-1).astype(dt), cpu_kernel)
        return x + linear(jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:], w["down"].astype(dt), cpu_kernel)
    kernel = cpu_kernel and not fuse  # the cached forward: no gradient (see _qkv)
    x = x + project(attn, w["o"], kernel)
    h = rms_norm(x, w["ln2"], cfg.rms_norm_eps)
    return x + project(jax.nn.silu(project(h, w["gate"], kernel)) * project(h, w["up"], kernel), w["down"], kernel)


FUSE_PROJECTIONS: bool | None = None  # None: fuse on CPU only


def _fuse_projections() -> bool:
    """One ``[H, q+k+v]`` and one ``[H, 2F]`` matmul instead of three and two: larger matmuls run closer to the
    CPU's peak and the input gradient becomes one product; the projections' weight gradients contract the
    activations first (``layers.linear``). Off on accelerators, where the concatenated weight would cut across a
    tensor-parallel sharding and remat policies should see plain dots."""
    return jax.default_backend() == "cpu" if FUSE_PROJECTIONS is None else FUSE_PROJECTIONS


def _decoder_layer(x, w, cfg: ModelConfig, cos, sin, *, segment_ids, cpu_kernel=False):
    q, k, v = _qkv(x, w, cfg, cos, sin, cpu_kernel=cpu_kernel)
    attn = full_attention(q, k, v, impl=cfg.attention, segment_ids=segment_ids, sliding_window=cfg.sliding_window,
                          cpu_kernel=cpu_kernel)
    return _finish(x, attn, w, cfg, cpu_kernel=cpu_kernel)


def _decoder_layer_cached(x, w, idx, cfg: ModelConfig, cos, sin, k_all, v_all, lengths, cpu_kernel=False):
    q, k, v = _qkv(x, w, cfg, cos, sin, fuse=False, cpu_kernel=cpu_kernel)
    b, t = x.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    cols = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    k_all = k_all.at[idx, rows, cols].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[idx, rows, cols].set(v.astype(v_all.dtype), mode="drop")
    attn = cached_attention(q, k_all, v_all, q_offset=lengths, impl=cfg.attention,
                            sliding_window=cfg.sliding_window, cpu_kernel=cpu_kernel, layer=idx)
    return _finish(x, attn.astype(x.dtype), w, cfg, fuse=False, cpu_kernel=cpu_kernel), k_all, v_all


# ---- the decode step over re-laid-out weights -------------------------------------------------------------------
@flax.struct.dataclass
class DecodeWeights:
    """The model's weights laid out for decoding: ``layers`` a list of per-layer dicts (q/k/v fused into ``qkv``,
    gate/up into ``gate_up``, in the compute dtype), ``embed [V, H]``, ``head [H, V]``, ``norm [H]``.

    The scanned forward slices stacked weights (on CPU every ``lax.scan`` step copies its slice), the tied head
    multiplies by the transposed embedding, and each step concatenates q/k/v: for one token per row that is
    ~25% of a decode step. ``decode_step`` runs the same layer code (``_qkv``, ``_finish``) over these arrays in
    a Python-unrolled loop (static slices only). Costs one extra copy of the weights. With ``cpu_kernels`` (one
    CPU device, float32; ``decode_weights(cpu_kernel=...)``) the matrices are packed ``[N/32, K, 32]`` for the
    few-row matmul and the attention over a heads-first cache runs ``kernels.cpu.decode_attention``.
    """

    layers: list[dict[str, jax.Array]]
    embed: jax.Array
    head: jax.Array
    norm: jax.Array
    cpu_kernels: bool = flax.struct.field(pytree_node=False, default=False)  # packed; attention by kernels.cpu
    # the matrices kept in the blocks of the model's source file (``set_decode_source``), e.g. ("Q4_1", "Q8_0")
    source_blocks: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


# the per-layer matrices ``decode_weights`` fuses (and may pack for the CPU kernel) and the projections they join,
# in order (columns side by side), named as the layer's modules and their Hugging Face tensors are
FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
PACKED = tuple(FUSED)
# the same parts by their names in ``_layer_weights`` ("self_attn.q_proj" -> "q")
_SOURCES = {n: tuple(p.rsplit(".", 1)[-1].removesuffix("_proj") for p in parts) for n, parts in FUSED.items()}


DecodeSource = Callable[[], dict[str, Any]]
_DECODE_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_decode_source(model: Transformer, build: DecodeSource | None) -> None:
    """Let ``decode_weights`` take ``model``'s big matrices from another store of exactly the same values: a
    GGUF file's quantised blocks, decoded by ``kernels.cpu`` to the float32 weights the loader dequantised, bit for
    bit, while reading a fifth to a third of the bytes. ``build()`` returns ``{"layers": [{name: QuantWeight}],
    "head": QuantWeight | None, "kinds": (GGUF type names)}`` (names among ``PACKED``; a matrix missing from any
    layer keeps the float copy). Called at most once per ``decode_weights`` and only where the CPU kernels run;
    ignored once any of ``model``'s parameters has been replaced (training, ``nnx.update``). ``None`` removes it."""
    if build is None:
        _DECODE_SOURCES.pop(model, None)
        return
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    _DECODE_SOURCES[model] = ([weakref.ref(a) for a in leaves], build)


def _decode_source(model: Transformer) -> DecodeSource | None:
    entry = _DECODE_SOURCES.get(model)
    if entry is None:
        return None
    refs, build = entry
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    if len(leaves) != len(refs) or any(r() is not a for r, a in zip(refs, leaves)):
        del _DECODE_SOURCES[model]  # the parameters changed: the source no longer holds them
        return None
    return build


def decode_weights(model: Transformer, *, cpu_kernel: bool | None = None) -> DecodeWeights:
    """Rearrange ``model``'s parameters (once, outside the decode loop); keeps each array's sharding family.

    ``cpu_kernel``: store the ``PACKED`` matrices and the head packed for ``kernels.cpu`` (those whose
    width is a multiple of 32), so ``decode_step`` runs them through the few-row CPU matmul, and its attention
    over a heads-first float32 cache through the CPU decode attention; matrices ``set_decode_source`` provides
    are taken from it instead (no float copy). ``None``: when the compute dtype is float32, the weights live on
    one CPU device and the decoding kernels run here (``kernels.cpu.decode_usable_on``)."""
    embed = model.embed_tokens[...]
    if cpu_kernel is None:
        cpu_kernel = model.cfg.compute_dtype == jnp.float32 and cpu_kernels.decode_usable_on(embed.sharding.device_set)
    params = _layer_weights(model.layers) | {
        "embed": embed, "norm": model.norm[...], "head": None if model.lm_head is None else model.lm_head[...]}
    build = _decode_source(model) if cpu_kernel and model.cfg.compute_dtype == jnp.float32 else None
    source = build() if build is not None else {"layers": [], "head": None, "kinds": ()}
    layers = source["layers"]
    taken = tuple(n for n in PACKED if len(layers) == model.cfg.num_layers and all(n in lw for lw in layers))
    drop = {name for n in taken for name in _SOURCES[n]} | ({"head"} if source["head"] is not None else set())
    out = _relayout({k: v for k, v in params.items() if k not in drop}, num_layers=model.cfg.num_layers,
                    dtype=model.cfg.compute_dtype, pack=cpu_kernel, skip=tuple(sorted(drop)))
    if not drop:
        return out
    return out.replace(layers=[lw | {n: q[n] for n in taken} for lw, q in zip(out.layers, layers)],
                       head=out.head if source["head"] is None else source["head"],
                       source_blocks=tuple(source["kinds"]))


def decode_matmul_kind(weights: Any) -> str:
    """How ``decode_step`` runs its matmuls and attention over ``weights``, for run summaries: ``"cpu kernels"``
    (``kernels.cpu``), else ``"xla"`` and, where the kernels cannot run, why."""
    if isinstance(weights, DecodeWeights) and weights.cpu_kernels:
        if weights.source_blocks:
            return f"cpu kernels (weights read as the file's {'/'.join(weights.source_blocks)} blocks)"
        return "cpu kernels"
    why = cpu_kernels.decode_reason()
    return "xla" if why is None else f"xla (cpu kernels: {why})"


def _packed(w: jax.Array, pack: bool) -> jax.Array:
    return cpu_kernels.pack(w) if pack and cpu_kernels.packable(w) else w


@functools.partial(jax.jit, static_argnames=("num_layers", "dtype", "pack", "skip"))
def _relayout(params: dict[str, Any], *, num_layers: int, dtype: Any, pack: bool = False,
              skip: tuple[str, ...] = ()) -> DecodeWeights:
    """``DecodeWeights`` from the stacked parameters (module level: same-shaped models share its compilation).
    ``skip``: stacked names left out of ``params`` (their fused matrices, or the head, are supplied after)."""
    layers = []
    for i in range(num_layers):
        w = {"ln1": params["ln1"][i], "ln2": params["ln2"][i]}
        for name, parts in _SOURCES.items():
            if parts[0] not in skip:
                w[name] = jnp.concatenate([params[p][i] for p in parts], axis=-1).astype(dtype)
        if "qb" in params:
            w["qkv_bias"] = jnp.concatenate([params["qb"][i], params["kb"][i], params["vb"][i]], -1).astype(dtype)
        if "qn" in params:
            w["qn"], w["kn"] = params["qn"][i], params["kn"][i]
        layers.append(w | {name: _packed(w[name], pack) for name in PACKED if name in w})
    if "head" in skip:
        head = None
    else:
        head = _packed((params["embed"].T if params["head"] is None else params["head"]).astype(dtype), pack)
    return DecodeWeights(layers=layers, embed=params["embed"], head=head, norm=params["norm"], cpu_kernels=pack)


def decode_logits(w: DecodeWeights, hidden: jax.Array) -> jax.Array:
    """float32 logits of final hidden states ``[..., H]`` (``Transformer.logits`` over ``DecodeWeights``)."""
    if cpu_kernels.is_packed(w.head):
        return decode_matmul(hidden, w.head)
    return jnp.matmul(hidden, w.head, preferred_element_type=jnp.float32)


def decode_step(w: DecodeWeights, cfg: ModelConfig, tokens: jax.Array, cache: LayerCache,
                width: int | None = None, shared: tuple[jax.Array, jax.Array] | None = None
                ) -> tuple[jax.Array, LayerCache]:
    """Feed ``tokens [B]`` at positions ``cache.lengths``; returns ``(logits [B, V] float32, cache)`` with the new
    keys/values written into each layer's cache (in place inside jit) and ``lengths + 1``.

    The same computation as ``Transformer.__call__(tokens[:, None], cache=...)`` (same layer functions and
    attention dispatch), over ``DecodeWeights`` and a ``LayerCache``. ``width`` (static, heads-first caches): read
    only the first ``width`` cached positions; rows at or beyond it get garbage logits. ``shared`` (``(lead [B],
    length [B])``): which rows' caches begin with the same positions (the CPU decode attention reads those once;
    the logits are the same without it)."""
    lengths = cache.lengths
    x = jnp.take(w.embed, tokens, axis=0).astype(cfg.compute_dtype)[:, None]
    cos, sin = rope_cos_sin(lengths[:, None], cfg)
    k_out, v_out = [], []
    for i, lw in enumerate(w.layers):
        q, k, v = _qkv(x, lw, cfg, cos, sin)
        attn, kc, vc = write_and_attend(q, k, v, cache.k[i], cache.v[i], lengths=lengths, impl=cfg.attention,
                                        sliding_window=cfg.sliding_window, heads_first=cache.heads_first,
                                        width=width, cpu_kernel=w.cpu_kernels, shared=shared)
        k_out.append(kc)
        v_out.append(vc)
        x = _finish(x, attn.astype(x.dtype), lw, cfg)
    x = rms_norm(x[:, 0], w.norm, cfg.rms_norm_eps)
    logits = decode_logits(w, x)
    return logits, cache.replace(k=tuple(k_out), v=tuple(v_out), lengths=lengths + 1)
