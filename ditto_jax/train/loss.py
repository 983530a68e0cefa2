"""Masked next-token cross-entropy computed chunk by chunk along the sequence, never holding all logits.

The language-model head (``hidden @ W``) and the loss are fused: each chunk of ``chunk`` positions builds its
logits, their log-sum-exp, the target logit and -- when differentiated -- the gradient with respect to the
hidden states and the head weight right away (``softmax - onehot``), so neither the forward nor the backward
pass keeps a ``[B, T, vocab]`` array alive. With a 150k vocabulary and 8k-token rows that is the difference
between fitting in memory or not; on CPU it also saves the memory traffic of writing and re-reading logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.model.layers import head_logits

#: Bytes of float32 logits one chunk may hold a device when the chunk is chosen for the run (``loss_chunk: null``).
#: CPU: the 40M model's train step at B=8 x 512 on a 2-core AMD EPYC VM ran 9.6 s with one 4,096-token chunk
#: (500 MiB of logits), 9.0 s with 2,048, 7.9 s with 1,024 (125 MiB), 8.2-8.3 s with 512 and 256 (chunked buffers
#: are reused by every iteration; large fresh ones are faulted in and zeroed each step). Accelerators: a budget,
#: not a measurement here; their presets name their chunk.
AUTO_CHUNK_BYTES = {"cpu": 128 * 2**20}
AUTO_CHUNK_BYTES_ACCELERATOR = 2**30


def auto_chunk(rows: int, seq_len: int, vocab: int, budget_bytes: int) -> int:
    """Positions a chunk for ``rows`` rows (a device's) of ``seq_len`` positions: the largest divisor of ``seq_len``
    whose float32 logits, ``rows x chunk x vocab``, fit ``budget_bytes``. Where that divisor is under a quarter of
    what the budget allows (a length with few divisors), the smallest divisor above it instead: a little more memory
    rather than hundreds of tiny chunks."""
    allowed = max(budget_bytes // max(rows * vocab * 4, 1), 1)
    divisors = [c for c in range(1, seq_len + 1) if seq_len % c == 0]
    best = max(c for c in divisors if c <= allowed)
    return best if best * 4 >= min(allowed, seq_len) else min(c for c in divisors if c >= allowed)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """``[B, T, ...] -> [T // chunk, B, chunk, ...]`` (the scan axis first; the batch axis keeps its sharding)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _chunk_stats(h, w, t, m, vocab_major, cpu_kernel=False):
    """Loss sum, correct count and the softmax pieces for one chunk."""
    lg = head_logits(h, w.astype(h.dtype), vocab_major, cpu_kernel)
    mx = jnp.max(lg, axis=-1, keepdims=True)
    e = jnp.exp(lg - mx)
    s = jnp.sum(e, axis=-1, keepdims=True)
    tgt = jnp.take_along_axis(lg, t[..., None], axis=-1)[..., 0]
    lse = jnp.log(s[..., 0]) + mx[..., 0]
    loss = jnp.sum((lse - tgt) * m)
    correct = jnp.sum(jnp.where(tgt >= mx[..., 0], m, 0.0))
    return loss, correct, e, s


def _check(hidden: jax.Array, targets: jax.Array, chunk: int) -> int:
    t = hidden.shape[1]
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets {targets.shape} do not match hidden states {hidden.shape[:2]}")
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"sequence length {t} is not a multiple of the loss chunk {chunk}")
    return chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array,
                          vocab_major: bool, chunk: int, cpu_kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sum over positions of ``mask * CE(hidden @ W, targets)`` and the masked count of correct argmaxes.

    Args:
      hidden: ``[B, T, H]`` final hidden states (compute dtype).
      weight: the head, ``[V, H]`` when ``vocab_major`` (tied embeddings) else ``[H, V]``.
      targets: int32 ``[B, T]``; mask: float ``[B, T]`` (0 drops a position).
      chunk: positions per chunk (``T`` must be a multiple, or smaller than it).
      cpu_kernel: the caller vouches for one CPU device: float32 products run ``kernels.cpu.matmul``.

    Returns:
      ``(loss_sum, correct_sum)`` as float32 scalars; only ``loss_sum`` is differentiable.
    """
    chunk = _check(hidden, targets, chunk)

    def body(carry, xs):
        h, t, m = xs
        loss, correct, _, _ = _chunk_stats(h, weight, t, m, vocab_major, cpu_kernel)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(mask.astype(jnp.float32), chunk))
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), xs)
    return loss, correct


def _fwd(hidden, weight, targets, mask, vocab_major, chunk, cpu_kernel):
    chunk = _check(hidden, targets, chunk)
    w = weight.astype(hidden.dtype)
    vocab = w.shape[0] if vocab_major else w.shape[1]

    def body(carry, xs):
        loss_acc, correct_acc, dw = carry
        h, t, m = xs
        loss, correct, e, s = _chunk_stats(h, w, t, m, vocab_major, cpu_kernel)
        # d loss / d logits = (softmax - onehot) * mask
        p = e * (m[..., None] / s) - jax.nn.one_hot(t, vocab, dtype=e.dtype) * m[..., None]
        p = p.astype(h.dtype)
        if cpu_kernels.matmul_serves(cpu_kernel, h, w):  # the same three products, transposes read in place
            dh = cpu_kernels.matmul_rows(p, w, trans_b=not vocab_major)
            dw = dw + cpu_kernels.matmul_rows(h, p, trans_a=True)
            return (loss_acc + loss, correct_acc + correct, dw), dh
        if vocab_major:
            dh = jnp.einsum("bcv,vh->bch", p, w, preferred_element_type=jnp.float32)
        else:
            dh = jnp.einsum("bcv,hv->bch", p, w, preferred_element_type=jnp.float32)
        # the weight gradient is accumulated as [H, V] whatever the head's layout: "bcv,bch->vh" makes XLA
        # transpose the [B, C, V] softmax gradient first (40M model, B=8, C=512, 2-core CPU: 1.05 s vs 0.68 s)
        dw = dw + jnp.einsum("bch,bcv->hv", h, p, preferred_element_type=jnp.float32)
        return (loss_acc + loss, correct_acc + correct, dw), dh.astype(h.dtype)

    zero = jnp.zeros((), jnp.float32)
    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(mask.astype(jnp.float32), chunk))
    dw0 = jnp.zeros((hidden.shape[-1], vocab), jnp.float32)
    (loss, correct, dw), dh = jax.lax.scan(body, (zero, zero, dw0), xs)
    b, t, h = hidden.shape
    dh = jnp.moveaxis(dh, 0, 1).reshape(b, t, h)
    dw = dw.T if vocab_major else dw
    return (loss, correct), (dh, dw.astype(weight.dtype), targets, mask)


def _bwd(vocab_major, chunk, cpu_kernel, res, g):
    dh, dw, targets, mask = res
    g_loss = g[0]
    return ((g_loss * dh).astype(dh.dtype), (g_loss * dw).astype(dw.dtype),
            None, jnp.zeros_like(mask))


chunked_cross_entropy.defvjp(_fwd, _bwd)


def reference_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array,
                            vocab_major: bool) -> tuple[jax.Array, jax.Array]:
    """The same quantity with all logits materialised (the test reference)."""
    spec = "bth,vh->btv" if vocab_major else "bth,hv->btv"
    lg = jnp.einsum(spec, hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(lg, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(correct * mask)
