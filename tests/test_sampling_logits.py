"""Token selection: filters equal Hugging Face's processors; the sort-free top-p sampler is exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.sampling.logits import (
    constraint_mask,
    inverse_cdf,
    processed_logits_reference,
    sample_nucleus,
    select_tokens,
)

V = 300
reference = jax.jit(processed_logits_reference)  # compiled once, not op by op: the suite's time is compiling


def _hf_processed(logits, input_ids, temperature, top_k, top_p, rep):
    scores = torch.tensor(logits)
    ids = torch.tensor(input_ids)
    if rep != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(rep)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.numpy()


def _row_params(b, temperature, top_k, top_p, rep):
    return dict(temperature=jnp.full((b,), temperature, jnp.float32), top_k=jnp.full((b,), top_k, jnp.int32),
                top_p=jnp.full((b,), top_p, jnp.float32), repetition_penalty=jnp.full((b,), rep, jnp.float32))


@pytest.mark.parametrize("temperature,top_k,top_p,rep", [
    (1.0, 0, 0.8, 1.1), (0.7, 20, 0.9, 1.0), (1.3, 5, 1.0, 1.3), (0.5, 0, 0.3, 1.1), (1.0, 50, 0.95, 0.9),
])
def test_filters_equal_transformers_processors(temperature, top_k, top_p, rep):
    rng = np.random.RandomState(0)
    logits = (rng.randn(4, V) * 3).astype(np.float32)
    input_ids = rng.randint(0, V, (4, 12))
    presence = np.zeros((4, V), bool)
    presence[np.arange(4)[:, None], input_ids] = True
    ours = reference(jnp.asarray(logits), presence=jnp.asarray(presence),
                     **_row_params(4, temperature, top_k, top_p, rep))
    want = _hf_processed(logits, input_ids, temperature, top_k, top_p, rep)
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(want))
    np.testing.assert_allclose(ours[~np.isinf(ours)], want[~np.isinf(want)], rtol=1e-6, atol=1e-6)


def test_inverse_cdf_picks_by_cumulative_mass():
    w = jnp.asarray([[0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0]] * 5, jnp.float32)
    u = jnp.asarray([0.0, 0.124, 0.126, 0.49, 0.999], jnp.float32)
    pick = jax.jit(inverse_cdf, static_argnames="bs")
    assert np.asarray(pick(w, u, bs=4)).tolist() == [1, 1, 3, 3, 6]
    # u beyond what rounding allows still lands on a positive weight
    assert int(pick(w[:1], jnp.asarray([1.0 - 1e-8]), bs=4)[0]) == 6


def _empirical(fn, n):
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.jit(jax.vmap(fn))(keys)
    return np.bincount(np.asarray(toks).ravel(), minlength=V) / n


@pytest.mark.parametrize("max_rounds", [32, 0])  # 0: every row goes through the exact sort fallback
def test_nucleus_sampler_matches_the_filtered_distribution(max_rounds):
    rng = np.random.RandomState(1)
    logits = jnp.asarray((rng.randn(1, V) * 2.5).astype(np.float32))
    params = _row_params(1, 0.9, 0, 0.8, 1.0)
    want = np.asarray(jax.nn.softmax(reference(logits, presence=None, **params)))[0]

    def draw(key):
        return select_tokens(logits, presence=None, keys=key[None], max_top_k=64, max_rounds=max_rounds, **params)[0]

    n = 20000
    freq = _empirical(draw, n)
    assert freq[want == 0].sum() == 0, "sampled a token outside the nucleus"
    assert np.abs(freq - want).sum() / 2 < 0.03  # total variation; sampling noise is ~0.01 at n=20000
    support = want > 0
    assert 2 < support.sum() < V  # the test exercises a real cut


def test_rejection_sampler_on_a_flat_distribution_keeps_the_exact_nucleus():
    # A nearly flat distribution (as a random-init model gives): the nucleus holds ~80% of the vocabulary.
    rng = np.random.RandomState(2)
    e = jnp.exp(jnp.asarray(rng.randn(1, V) * 0.3, jnp.float32))
    p = np.asarray(e[0] / e.sum())
    order = np.argsort(-p)
    exclusive = np.cumsum(p[order]) - p[order]
    nucleus = set(order[exclusive < 0.8].tolist())
    keys = jax.random.split(jax.random.key(3), 4000)
    toks = jax.jit(jax.vmap(lambda k: sample_nucleus(e, jnp.asarray([0.8]), k[None], jnp.asarray([True]), 64)[0]))(keys)
    got = set(np.asarray(toks).tolist())
    assert got <= nucleus and len(got) > 0.8 * len(nucleus)


def test_greedy_rows_take_the_penalised_argmax_and_logprobs_are_raw():
    logits = jnp.asarray([[1.0, 3.0, 2.9, -1.0], [0.5, 0.1, 0.2, 0.3]], jnp.float32)
    presence = jnp.asarray([[False, True, False, False], [False] * 4])
    params = _row_params(2, 0.0, 0, 1.0, 1.2)
    select = jax.jit(lambda lg, pr, keys: select_tokens(lg, presence=pr, keys=keys, max_top_k=4, **params))
    toks, lps = select(logits, presence, jax.random.split(jax.random.key(0), 2))
    assert np.asarray(toks).tolist() == [2, 0]  # 3.0 / 1.2 = 2.5 < 2.9
    want = np.asarray(jax.nn.log_softmax(logits))[[0, 1], [2, 0]]
    np.testing.assert_allclose(np.asarray(lps), want, rtol=1e-6)


def test_top_k_beyond_the_static_bound_is_rejected_by_the_engine_not_silently_clipped():
    from ditto_jax.model import ModelConfig, create_model
    from ditto_jax.sampling import Request, SamplingEngine, SamplingParams

    cfg = ModelConfig(vocab_size=128, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    engine = SamplingEngine(create_model(cfg), None, batch_size=1, max_len=16, max_top_k=8)
    with pytest.raises(ValueError, match="max_top_k"):
        list(engine.generate([Request("a", [1, 2], SamplingParams(top_k=9))]))


def _tables(rng, states, classes, constraints, vocab):
    next_state = rng.randint(-1, states, (states, classes)).astype(np.int32)
    next_state[:, 0] = 0  # every state allows class 0: no row is left without a token
    token_class = rng.randint(0, classes, (constraints, vocab)).astype(np.int32)
    return jnp.asarray(next_state), jnp.asarray(token_class)


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason=f"CPU kernels: {cpu_kernels.reason()}")


@needs_kernels
@pytest.mark.parametrize("max_rounds", [32, 0])  # 0: every row goes through the kernel's sort fallback
@pytest.mark.parametrize("top_k,rep", [(0, 1.0), (20, 1.3)])
def test_the_cpu_kernel_samples_the_filtered_distribution(max_rounds, top_k, rep):
    rng = np.random.RandomState(1)
    n = 20000
    logits = jnp.asarray((rng.randn(1, V) * 2.5).astype(np.float32))
    presence = jnp.asarray(rng.rand(1, V) < 0.2)
    params = _row_params(1, 0.9, top_k, 0.8, rep)
    want = np.asarray(jax.nn.softmax(reference(logits, presence=presence, **params)))[0]
    rows = {k: jnp.broadcast_to(a, (n,)) for k, a in params.items()}
    toks, _ = jax.jit(lambda k: select_tokens(jnp.broadcast_to(logits, (n, V)), presence=jnp.broadcast_to(
        presence, (n, V)), keys=k, max_top_k=64, max_rounds=max_rounds, kernel=True, **rows))(
        jax.random.split(jax.random.key(0), n))
    freq = np.bincount(np.asarray(toks), minlength=V) / n
    assert freq[want == 0].sum() == 0, "sampled a token outside the filtered distribution"
    assert np.abs(freq - want).sum() / 2 < 0.03  # total variation; sampling noise is ~0.01 at n=20000
    assert 2 < (want > 0).sum() < V


@needs_kernels
@pytest.mark.parametrize("vocab", [V, 4096])  # a vocabulary off the 16-lane and block grid, and one on it
def test_the_cpu_kernel_follows_the_xla_sampler(vocab):
    """The same random numbers and the same algorithm: greedy rows and log-probabilities equal, sampled tokens
    equal but where float rounding moves a draw across a boundary, constraints and filters kept."""
    rng = np.random.RandomState(7)
    b = 96
    logits = jnp.asarray((rng.randn(b, vocab) * rng.choice([0.5, 2.0, 6.0], (b, 1))).astype(np.float32))
    presence = jnp.asarray(rng.rand(b, vocab) < 0.05)
    params = dict(temperature=jnp.asarray(rng.choice([0.0, 0.7, 1.0, 1.5], b), jnp.float32),
                  top_k=jnp.asarray(rng.choice([0, 0, 1, 7, 50], b), jnp.int32),
                  top_p=jnp.asarray(rng.choice([1.0, 0.9, 0.5, 0.05], b), jnp.float32),
                  repetition_penalty=jnp.asarray(rng.choice([1.0, 1.2, 0.8], b), jnp.float32))
    tables = _tables(rng, 5, 6, 3, vocab)
    cstate = jnp.asarray(rng.randint(-1, 5, b), jnp.int32)
    ccon = jnp.asarray(rng.randint(0, 3, b), jnp.int32)
    keys = jax.random.split(jax.random.key(11), b)

    def run(kernel):
        return jax.jit(lambda lg: select_tokens(lg, constraint=(tables, cstate, ccon), presence=presence, keys=keys,
                                                max_top_k=64, kernel=kernel, **params))(logits)

    (want, want_lp), (got, got_lp) = (tuple(map(np.asarray, run(k))) for k in (False, True))
    greedy = np.asarray(params["temperature"]) == 0
    np.testing.assert_array_equal(got[greedy], want[greedy])
    same = got == want
    assert same.mean() >= 0.95, f"{(~same).sum()} of {b} rows differ"
    np.testing.assert_allclose(got_lp[same], want_lp[same], rtol=1e-5, atol=1e-5)
    masked = jax.jit(constraint_mask)(logits, tables, cstate, ccon)
    allowed = np.isfinite(np.asarray(reference(masked, presence=presence, **params)))
    assert allowed[np.arange(b), got].all(), "a token outside the filters or the constraint"
    np.testing.assert_allclose(got_lp, np.asarray(jax.nn.log_softmax(logits))[np.arange(b), got], atol=1e-5)


@needs_kernels
def test_the_cpu_kernel_refuses_mismatched_shapes():
    row = jnp.ones((2,), jnp.float32)
    with pytest.raises(ValueError, match="select_tokens"):
        cpu_kernels.select_tokens(jnp.zeros((2, 8)), jnp.zeros((2, 9), bool), row, None, row, row, row,
                                  jnp.zeros((2, 3)))
