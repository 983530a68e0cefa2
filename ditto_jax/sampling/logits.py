"""Next-token selection inside jit: repetition penalty, temperature, top-k, top-p, constraint masks.

Semantics are Hugging Face's processors, applied in this order: repetition penalty (on every token present in
the prompt or the output), constraint mask, temperature, top-k (drop scores below the k-th largest),
top-p (keep the smallest prefix of the descending order whose mass reaches ``top_p``). ``temperature == 0``
takes the argmax of the penalised, masked logits.

No full-vocabulary sort per step (on CPU a ``[B, V]`` sort costs more than the whole decoder step). The
nucleus is sampled *exactly* by pivot rejection (the scheme of FlashInfer's sorting-free sampling):

1. draw ``j`` from the eligible weights above ``pivot`` (``pivot = 0`` first) by inverse CDF in vocabulary
   order (two-level: block sums, then one block), which needs no sort;
2. ``j`` is in the nucleus iff the mass of tokens strictly more likely than ``j`` is ``< top_p * Z``; accept;
3. otherwise ``j`` lies below the nucleus threshold: set ``pivot = p_j`` and draw again.

The set above the pivot always contains the whole nucleus, so conditioned on acceptance ``j`` follows the
nucleus distribution exactly. Each round costs three passes over ``[B, V]``; acceptance probability is
``>= top_p`` per round and a rejection removes at least the sampled token and everything below it, so a few
rounds suffice (the loop stops when every row accepted). After ``max_rounds`` the remaining rows take an
exact sort-based path (never reached in practice; it exists so the result is exact by construction).
Ties at the nucleus boundary keep every tied token (Hugging Face keeps those its sort order puts first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ditto_jax.kernels import cpu as cpu_kernels

NEG_INF = -jnp.inf


def block_size(vocab: int) -> int:
    """Block width of the two-level inverse CDF: a power of two near ``sqrt(vocab)`` dividing ``vocab`` if possible."""
    for bs in (256, 512, 128, 64):
        if vocab % bs == 0:
            return bs
    return 256


def apply_repetition_penalty(logits: jax.Array, presence: jax.Array, penalty: jax.Array) -> jax.Array:
    """Hugging Face's repetition penalty: a present token's logit is divided by ``penalty`` if positive, else multiplied."""
    pen = penalty[:, None]
    penalised = jnp.where(logits < 0, logits * pen, logits / pen)
    return jnp.where(presence, penalised, logits)


def constraint_mask(scores: jax.Array, tables: tuple[jax.Array, jax.Array], cstate: jax.Array,
                    ccon: jax.Array) -> jax.Array:
    """``scores`` with ``-inf`` where a row's constraint state (``cstate >= 0``; ``tables = (next_state [S, C],
    token_class [NC, V])``, ``ccon`` the row's constraint) has no transition on the token's class."""
    next_state, token_class = tables

    def masked(s):
        cls = token_class[ccon]  # [B, V]
        allowed = next_state[jnp.maximum(cstate, 0)[:, None], cls] >= 0
        allowed = allowed | (cstate < 0)[:, None]
        return jnp.where(allowed, s, -jnp.inf)

    return jax.lax.cond(jnp.any(cstate >= 0), masked, lambda s: s, scores)


def top_k_threshold(scores: jax.Array, top_k: jax.Array, max_top_k: int) -> jax.Array:
    """Per-row k-th largest score (``-inf`` where ``top_k == 0`` or ``top_k >= vocab``); ``top_k <= max_top_k``."""
    vocab = scores.shape[-1]
    k_static = min(max_top_k, vocab)
    vals, _ = jax.lax.top_k(scores, k_static)
    idx = jnp.clip(top_k - 1, 0, k_static - 1)
    kth = jnp.take_along_axis(vals, idx[:, None], axis=-1)[:, 0]
    return jnp.where((top_k > 0) & (top_k < vocab), kth, NEG_INF)


def _last_true(mask: jax.Array) -> jax.Array:
    """Index of the last True along the last axis (0 if none)."""
    n = mask.shape[-1]
    return n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


def _prefix_sums(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over a short last axis as one triangular matmul (compiles far faster on CPU
    than the associative-scan lowering of ``jnp.cumsum``; full float32 precision on every backend)."""
    n = x.shape[-1]
    tri = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.matmul(x, tri, precision=jax.lax.Precision.HIGHEST)


def inverse_cdf(weights: jax.Array, u: jax.Array, bs: int) -> jax.Array:
    """Index ``i`` with ``cumsum(w)[i-1] <= u * sum(w) < cumsum(w)[i]`` per row (vocabulary order), never a
    zero-weight index. ``weights [B, V]`` nonnegative with positive sum, ``u [B]`` in ``[0, 1)``."""
    b, v = weights.shape
    pad = (-v) % bs
    if pad:
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    nb = weights.shape[1] // bs
    w3 = weights.reshape(b, nb, bs)
    blocks = jnp.sum(w3, axis=-1)
    cb = _prefix_sums(blocks)
    target = u * cb[:, -1]
    bi = jnp.minimum(jnp.sum(cb <= target[:, None], axis=-1), nb - 1)
    # Rounding can put the target at/after the total: fall back to the last block holding mass.
    bi = jnp.where(jnp.take_along_axis(cb, bi[:, None], -1)[:, 0] > target, bi, _last_true(blocks > 0))
    base = jnp.where(bi > 0, jnp.take_along_axis(cb, jnp.maximum(bi - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w3, bi[:, None, None], axis=1)[:, 0]
    cw = base[:, None] + _prefix_sums(inner)
    ti = jnp.minimum(jnp.sum(cw <= target[:, None], axis=-1), bs - 1)
    ok = jnp.take_along_axis(inner, ti[:, None], -1)[:, 0] > 0
    ti = jnp.where(ok, ti, _last_true(inner > 0))
    return (bi * bs + ti).astype(jnp.int32)


def _uniform(keys: jax.Array, salt: jax.Array | int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, salt), (), jnp.float32))(keys)


def _round_uniforms(keys: jax.Array, rounds: int) -> jax.Array:
    """``[B, rounds]``: column ``r`` is ``_uniform(keys, r)``, round ``r``'s draw."""
    return jax.vmap(lambda r: _uniform(keys, r), out_axes=1)(jnp.arange(rounds, dtype=jnp.int32))


def _nucleus_threshold_by_sort(e: jax.Array, limit: jax.Array) -> jax.Array:
    """Exact nucleus threshold ``tau`` (keep ``e >= tau``) by a full sort: the slow, exact fallback."""
    s = -jnp.sort(-e, axis=-1)
    exclusive = jnp.cumsum(s, axis=-1) - s
    count = jnp.maximum(jnp.sum(exclusive < limit[:, None], axis=-1), 1)
    return jnp.take_along_axis(s, (count - 1)[:, None], -1)[:, 0]


def sample_nucleus(e: jax.Array, top_p: jax.Array, keys: jax.Array, active: jax.Array, bs: int,
                   max_rounds: int = 32) -> jax.Array:
    """Sample from weights ``e [B, V]`` restricted to their top-p nucleus (exact; see module docstring).

    Rows where ``active`` is False return 0 and cost nothing extra. A row still unaccepted after
    ``max_rounds`` draws once more from ``e >= tau`` with the exact threshold ``tau`` found by sorting.
    """
    z = jnp.sum(e, axis=-1)
    limit = top_p * z
    no_filter = top_p >= 1.0

    def cond(carry):
        r, _, _, accepted = carry
        return (r <= max_rounds) & jnp.any(~accepted)

    def body(carry):
        r, pivot, tok, accepted = carry
        last = r == max_rounds
        below_tau = lambda p: jnp.where(accepted, p, jnp.nextafter(_nucleus_threshold_by_sort(e, limit), -1.0))
        pivot = jax.lax.cond(last, below_tau, lambda p: p, pivot)
        w = jnp.where(e > pivot[:, None], e, 0.0)
        j = inverse_cdf(w, _uniform(keys, r), bs)
        ej = jnp.take_along_axis(e, j[:, None], -1)[:, 0]
        above = jnp.sum(jnp.where(e > ej[:, None], e, 0.0), axis=-1)
        ok = no_filter | (above < limit) | last
        tok = jnp.where(~accepted & ok, j, tok)
        pivot = jnp.where(~accepted & ~ok, ej, pivot)
        return r + 1, pivot, tok, accepted | ok

    b = e.shape[0]
    init = (jnp.int32(0), jnp.full((b,), -1.0, e.dtype), jnp.zeros((b,), jnp.int32), ~active)
    return jax.lax.while_loop(cond, body, init)[2]


def select_tokens(logits: jax.Array, *, presence: jax.Array | None,
                  constraint: tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array] | None = None,
                  temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, repetition_penalty: jax.Array,
                  keys: jax.Array, max_top_k: int, max_rounds: int = 32,
                  kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Choose the next token of every row. Returns ``(tokens [B] int32, logprobs [B])``.

    ``logits [B, V]`` float32 (raw model output); ``constraint = (tables, cstate, ccon)`` masks the tokens each
    constrained row may not take (``constraint_mask``); ``presence [B, V]`` bool marks tokens already seen
    (repetition penalty); per-row ``temperature/top_k/top_p/repetition_penalty [B]``; ``keys [B]`` typed PRNG keys
    for this step.
    The log-probability is under the raw distribution (``log_softmax(logits)``).

    ``kernel`` (the caller vouches for ``kernels.cpu.available()`` and one CPU device): everything after the
    repetition penalty and the top-k threshold runs in ``kernels.cpu.select_tokens``, the same algorithm with the
    same random numbers (the tokens differ only where float rounding moves a draw across a boundary).
    """
    def penalised_masked(logits):
        scores = logits
        if presence is not None:
            scores = jax.lax.cond(jnp.any(repetition_penalty != 1.0),
                                  lambda s: apply_repetition_penalty(s, presence, repetition_penalty),
                                  lambda s: s, scores)
        return scores if constraint is None else constraint_mask(scores, *constraint)

    if kernel:
        # scores / t keeps the order of scores, so the k-th largest scaled score is the k-th largest score over t;
        # the scores are built here only for top-k (the kernel builds its own)
        t = jnp.where(temperature > 0, temperature, 1.0)
        kth = jax.lax.cond(jnp.any(top_k > 0), lambda l: top_k_threshold(penalised_masked(l), top_k, max_top_k) / t,
                           lambda l: jnp.full(l.shape[:1], NEG_INF, l.dtype), logits)
        return cpu_kernels.select_tokens(logits, presence, repetition_penalty, constraint, temperature, kth, top_p,
                                         _round_uniforms(keys, max_rounds + 1))
    scores = penalised_masked(logits)
    raw_lse = jax.nn.logsumexp(logits, axis=-1)
    sampled_rows = temperature > 0
    greedy = jax.lax.cond(jnp.all(sampled_rows), lambda s: jnp.zeros(s.shape[:1], jnp.int32),
                          lambda s: jnp.argmax(s, axis=-1).astype(jnp.int32), scores)
    scaled = scores / jnp.where(sampled_rows, temperature, 1.0)[:, None]
    kth = jax.lax.cond(jnp.any(top_k > 0), lambda s: top_k_threshold(s, top_k, max_top_k),
                       lambda s: jnp.full(s.shape[:1], NEG_INF, s.dtype), scaled)
    row_max = jnp.max(scaled, axis=-1, keepdims=True)
    e = jnp.where(scaled >= kth[:, None], jnp.exp(scaled - row_max), 0.0)
    sampled = sample_nucleus(e, top_p, keys, sampled_rows, block_size(logits.shape[-1]), max_rounds)
    tokens = jnp.where(sampled_rows, sampled, greedy)
    logprobs = jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - raw_lse
    return tokens, logprobs


def processed_logits_reference(logits: jax.Array, *, presence: jax.Array | None, temperature: jax.Array,
                               top_k: jax.Array, top_p: jax.Array, repetition_penalty: jax.Array) -> jax.Array:
    """The filtered, temperature-scaled scores exactly as Hugging Face's processors compute them (with a full
    sort): the distribution ``select_tokens`` samples from is ``softmax`` of this. For tests and reference only."""
    scores = logits
    if presence is not None:
        scores = apply_repetition_penalty(scores, presence, repetition_penalty)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scores = scores / t
    kth = top_k_threshold(scores, top_k, scores.shape[-1])
    scores = jnp.where(scores < kth[:, None], NEG_INF, scores)
    order = jnp.argsort(scores, axis=-1)  # ascending, as Hugging Face's TopPLogitsWarper
    sorted_scores = jnp.take_along_axis(scores, order, -1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cum <= (1 - top_p[:, None])
    remove_sorted = remove_sorted.at[:, -1].set(False)
    remove_sorted = remove_sorted & (top_p[:, None] < 1.0)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(scores.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, scores)
