"""The jitted SFT train step (gradient accumulation, masked per-token loss, AdamW) and the eval step.

State is a plain pytree (``TrainState``): fp32 master parameters as a nested dict (the model's
``nnx.State`` in pure-dict form, names as in Hugging Face), the optax state, the step and an RNG key. The
model's graph definition is static; each step merges it with the parameters (trace time only), so the
jitted function is compiled once, with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.mesh import batch_sharding, param_shardings
from ditto_jax.model import Transformer
from ditto_jax.train.loss import AUTO_CHUNK_BYTES, AUTO_CHUNK_BYTES_ACCELERATOR, auto_chunk, chunked_cross_entropy

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; what a checkpoint stores (with the data iterator state)."""

    step: jax.Array
    params: dict[str, Any]
    opt_state: Any
    rng: jax.Array


def split_model(model: Transformer) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The static graph definition and the parameters as a nested dict of arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge_model(graphdef: nnx.GraphDef, params: dict[str, Any]) -> Transformer:
    """A model object from a graph definition and parameters (inside or outside jit)."""
    return nnx.merge(graphdef, nnx.State(params))


def _head(model: Transformer) -> tuple[jax.Array, bool]:
    """The output projection and whether it is vocab-major (``[V, H]``: tied embeddings)."""
    if model.lm_head is None:
        return model.embed_tokens[...], True
    return model.lm_head[...], False


def loss_chunk_for(loss_chunk: int | None, rows: int, seq_len: int, vocab: int, mesh: Mesh | None) -> int:
    """Positions a chunk of the fused head + loss for a (micro-)batch of ``rows x seq_len``: ``loss_chunk`` as given
    (at most ``seq_len``), or for ``None`` ``loss.auto_chunk`` over the rows one device holds, within
    ``AUTO_CHUNK_BYTES`` of its platform."""
    if loss_chunk is not None:
        return min(loss_chunk, seq_len)
    if mesh is None:
        rows_here, platform = rows, jax.default_backend()
    else:
        rows_here = batch_sharding(mesh, 2).shard_shape((rows, seq_len))[0]
        platform = mesh.devices.flat[0].platform
    return auto_chunk(rows_here, seq_len, vocab, AUTO_CHUNK_BYTES.get(platform, AUTO_CHUNK_BYTES_ACCELERATOR))


def loss_sums(graphdef: nnx.GraphDef, params: dict[str, Any], batch: Batch, loss_chunk: int | None,
              cpu_kernel: bool = False, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token losses, masked correct count)`` for one (micro-)batch. ``cpu_kernel``: the caller
    vouches for one CPU device (the model's and the loss's float32 products run ``kernels.cpu.matmul``).
    ``loss_chunk``/``mesh``: see ``loss_chunk_for``."""
    model = merge_model(graphdef, params)
    hidden = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                   return_hidden=True, cpu_kernel=cpu_kernel)
    weight, vocab_major = _head(model)
    rows, seq_len = batch["tokens"].shape
    chunk = loss_chunk_for(loss_chunk, rows, seq_len, weight.shape[0 if vocab_major else 1], mesh)
    return chunked_cross_entropy(hidden, weight, batch["targets"], batch["loss_mask"], vocab_major, chunk,
                                 cpu_kernel)


def _micro_batches(batch: Batch, accum: int, mesh: Mesh | None) -> Batch:
    """``[B, S] -> [accum, B // accum, S]`` taking rows ``j, j + accum, ...`` for micro-step ``j``.

    Strided rows keep every micro-batch spread over all data-parallel devices (a contiguous split would put
    each micro-batch on a subset of them).
    """

    def one(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
        if mesh is not None:
            spec = batch_sharding(mesh, x.ndim).spec
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, *spec)))
        return y

    return {k: one(v) for k, v in batch.items()}


def grads_and_stats(graphdef: nnx.GraphDef, params: dict[str, Any], batch: Batch, *, accum: int,
                    loss_chunk: int | None, mesh: Mesh | None, cpu_kernel: bool = False
                    ) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the mean token loss over the whole batch (all micro-steps normalised by one token count)."""
    tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    value_and_grad = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b, loss_chunk, cpu_kernel, mesh),
                                        has_aux=True)
    if accum == 1:
        (loss_sum, correct), grad_sum = value_and_grad(params, batch)
    else:
        def body(carry, micro):
            (loss_i, correct_i), grad_i = value_and_grad(params, micro)
            g, l, c = carry
            return (jax.tree.map(jnp.add, g, grad_i), l + loss_i, c + correct_i), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zero = jnp.zeros((), jnp.float32)
        (grad_sum, loss_sum, correct), _ = jax.lax.scan(body, (zeros, zero, zero), _micro_batches(batch, accum, mesh))
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grad_sum)
    return grads, {"loss": loss_sum * scale, "accuracy": correct * scale, "tokens": tokens}


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum: int, loss_chunk: int | None, mesh: Mesh | None,
               cpu_kernel: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over a global batch; returns the new state and scalar metrics."""
    grads, stats = grads_and_stats(graphdef, state.params, batch, accum=accum, loss_chunk=loss_chunk, mesh=mesh,
                                   cpu_kernel=cpu_kernel)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(stats, grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                   finite=jnp.isfinite(stats["loss"]) & jnp.isfinite(grad_norm))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics


def eval_step(params: dict[str, Any], batch: Batch, *, graphdef: nnx.GraphDef, loss_chunk: int | None,
              mesh: Mesh | None = None, cpu_kernel: bool = False) -> dict[str, jax.Array]:
    """Sums for validation: ``loss_sum``, ``correct`` and ``tokens`` (the caller divides)."""
    loss_sum, correct = loss_sums(graphdef, params, batch, loss_chunk, cpu_kernel, mesh)
    return {"loss_sum": loss_sum, "correct": correct, "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32))}


def state_shardings(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: dict | None = None) -> TrainState:
    """Shardings of every state leaf: parameters by the logical-axis rules, optimizer moments like their
    parameters, counters and the RNG key replicated. ``model`` may be abstract (``nnx.eval_shape``)."""
    abstract = nnx.state(model, nnx.Param)
    p_shard = nnx.to_pure_dict(param_shardings(abstract, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract))
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)


def abstract_state(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: dict | None = None) -> TrainState:
    """``ShapeDtypeStruct``s (with shardings) of the state: the target a checkpoint is restored into."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=jax.eval_shape(lambda: params),
                        opt_state=jax.eval_shape(tx.init, params),
                        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        state_shardings(model, tx, mesh, rules))


def init_state(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
               rules: dict | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` and build its sharded ``TrainState`` (fresh optimizer state, step 0)."""
    shardings = state_shardings(model, tx, mesh, rules)
    graphdef, params = split_model(model)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    rng = jax.device_put(jax.random.PRNGKey(seed), shardings.rng)
    return graphdef, TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """Every batch array ``[B, S]`` sharded over the data-parallel axes."""
    return {k: batch_sharding(mesh, 2) for k in BATCH_KEYS}


def compile_train_step(graphdef: nnx.GraphDef, shardings: TrainState, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, *, accum: int, loss_chunk: int | None, mesh: Mesh
                       ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` of ``train_step``: the state's shardings in and out, the batch sharded over the data axes,
    metrics replicated, the state donated (updated in place). Call ``.lower(...).compile()`` to compile once.
    On one CPU device the products run ``kernels.cpu.matmul`` (``cpu_kernel`` of ``loss_sums``)."""
    fn = _bind(train_step, graphdef=graphdef, tx=tx, schedule=schedule, accum=accum, loss_chunk=loss_chunk,
               mesh=mesh, cpu_kernel=cpu_kernels.usable_on(mesh.devices.flat))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(shardings, batch_shardings(mesh)), out_shardings=(shardings, replicated),
                   donate_argnums=0)


def compile_eval_step(graphdef: nnx.GraphDef, shardings: TrainState, *, loss_chunk: int | None, mesh: Mesh
                      ) -> Callable[[dict[str, Any], Batch], dict[str, jax.Array]]:
    """``jax.jit`` of ``eval_step`` (parameters not donated)."""
    fn = _bind(eval_step, graphdef=graphdef, loss_chunk=loss_chunk, mesh=mesh,
               cpu_kernel=cpu_kernels.usable_on(mesh.devices.flat))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(shardings.params, batch_shardings(mesh)), out_shardings=replicated)


def abstract_batch(global_batch: int, seq_len: int, mesh: Mesh) -> Batch:
    """``ShapeDtypeStruct``s of a global batch (for ahead-of-time compilation)."""
    dtypes = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
              "positions": jnp.int32}
    sh = batch_shardings(mesh)
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), dtypes[k], sharding=sh[k]) for k in BATCH_KEYS}


def _bind(fn: Callable, **kwargs: Any) -> Callable:
    def bound(*args: Any) -> Any:
        return fn(*args, **kwargs)

    # jit names its compilations (logs, jax.monitoring events) after the function: keep "train_step"/"eval_step"
    bound.__name__ = bound.__qualname__ = fn.__name__
    return bound
