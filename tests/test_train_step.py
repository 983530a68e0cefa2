"""Train step: fused loss vs a reference, accumulation and sharding invariance, optimizer schedule and mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.mesh import MeshConfig, batch_sharding, make_mesh
from ditto_jax.model import create_model, load_model_config, transformer
from ditto_jax.model.layers import linear
from ditto_jax.train import step as steplib
from ditto_jax.train.loss import AUTO_CHUNK_BYTES, auto_chunk, chunked_cross_entropy, reference_cross_entropy
from ditto_jax.train.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer


def _batch(b: int = 8, t: int = 32, vocab: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
    """Two packed segments per row plus padding, and a partial loss mask."""
    r = np.random.RandomState(seed)
    tok = r.randint(0, vocab, (b, t + 1)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    seg[:, -4:] = 0
    pos = np.where(np.arange(t) < t // 2, np.arange(t), np.arange(t) - t // 2).astype(np.int32)
    pos = np.where(seg == 0, 0, pos)
    mask = ((r.rand(b, t) > 0.3) & (seg > 0)).astype(np.float32)
    return {"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": mask, "segment_ids": seg, "positions": pos}


@pytest.mark.parametrize("cpu_kernel", [False, True])
@pytest.mark.parametrize("vocab_major", [True, False])
def test_chunked_loss_and_grads_match_reference(vocab_major: bool, cpu_kernel: bool) -> None:
    """``cpu_kernel``: the three products of each chunk run ``kernels.cpu.matmul`` (one CPU device)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k1, (3, 32, 16))
    w = jax.random.normal(k2, (40, 16) if vocab_major else (16, 40)) * 0.3
    t = jax.random.randint(k3, (3, 32), 0, 40)
    m = (jax.random.uniform(k3, (3, 32)) > 0.4).astype(jnp.float32)

    def fused(h, w):
        return chunked_cross_entropy(h, w, t, m, vocab_major, 8, cpu_kernel)

    def ref(h, w):
        return reference_cross_entropy(h, w, t, m, vocab_major)

    (loss, correct), (want_loss, want_correct) = jax.jit(fused)(h, w), jax.jit(ref)(h, w)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(correct, want_correct)
    gf, gr = (jax.jit(jax.grad(lambda *a, f=f: f(*a)[0], argnums=(0, 1)))(h, w) for f in (fused, ref))
    for a, b in zip(gf, gr):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_cpu_projection_gradients_equal_plain_matmul_gradients(monkeypatch, remat: str) -> None:
    """The CPU layout (fused q/k/v and gate/up projections through ``layers.linear``, whose weight gradient is
    an explicit einsum), with and without rematerialisation, gives the parameter gradients of plain
    per-projection matmuls under autodiff."""
    cfg = load_model_config("model/tiny").model_copy(update={"qkv_bias": True})
    params = nnx.state(create_model(cfg, seed=3))
    batch = _batch(b=2, t=16, vocab=cfg.vocab_size, seed=5)

    def grad_of(model_cfg):
        graphdef = nnx.graphdef(create_model(model_cfg, seed=0))

        def loss(p):
            logits = nnx.merge(graphdef, p)(batch["tokens"], segment_ids=batch["segment_ids"],
                                            positions=batch["positions"])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
            return jnp.sum(nll * batch["loss_mask"])

        return jax.jit(jax.grad(loss))(params)

    monkeypatch.setattr(transformer, "FUSE_PROJECTIONS", True)
    fused = grad_of(cfg.model_copy(update={"remat": remat}))
    monkeypatch.setattr(transformer, "FUSE_PROJECTIONS", False)
    plain = grad_of(cfg)
    flat_fused, flat_plain = jax.tree.leaves(fused), jax.tree.leaves(plain)
    assert len(flat_fused) == len(flat_plain) > 0
    for a, b in zip(flat_fused, flat_plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.max(jnp.abs(a))) > 0 for a in flat_fused)


def test_linear_vjp_is_the_matmul_vjp() -> None:
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    w = jax.random.normal(jax.random.PRNGKey(2), (8, 12))
    g = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 12))
    out, vjp = jax.vjp(linear, x, w)
    ref_out, ref_vjp = jax.vjp(jnp.matmul, x, w)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    for a, b in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_linear_on_the_cpu_kernel_is_the_matmul_and_its_vjp() -> None:
    """``cpu_kernel=True``: the product and both gradients run ``kernels.cpu.matmul`` (the weight gradient reading
    the activations transposed in place) and equal XLA's; the compiled step holds the custom calls."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    w = jax.random.normal(jax.random.PRNGKey(2), (8, 12))
    g = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 12))

    def both(x, w, g):
        out, vjp = jax.vjp(lambda x, w: linear(x, w, True), x, w)
        return out, *vjp(g)

    got = jax.jit(both)(x, w, g)
    ref_out, ref_vjp = jax.vjp(jnp.matmul, x, w)
    for a, b in zip(got, (ref_out, *ref_vjp(g))):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert jax.jit(both).lower(x, w, g).as_text().count("ditto_gemm") == 3


def test_chunk_must_divide_sequence() -> None:
    h = jnp.zeros((1, 10, 4))
    with pytest.raises(ValueError, match="multiple of the loss chunk"):
        chunked_cross_entropy(h, jnp.zeros((8, 4)), jnp.zeros((1, 10), jnp.int32), jnp.ones((1, 10)), True, 4)


@pytest.mark.parametrize("rows, seq_len, vocab, budget, want", [
    (8, 512, 32000, 128 * 2**20, 128),   # the 40M benchmark: 1,024 tokens, 125 MiB
    (2, 512, 49152, 128 * 2**20, 256),   # SmolLM2 at its preset's batch: 256 x 2 x 49152 x 4 = 96 MiB
    (1, 100, 10, 2**20, 100),            # everything fits: one chunk
    (8, 96, 1000, 8 * 24 * 1000 * 4, 24),  # exactly at the budget
    (8, 96, 1000, 8 * 24 * 1000 * 4 - 1, 16),  # one byte less: the next divisor down
    (8, 509, 32000, 128 * 2**20, 509),   # a prime length: one chunk rather than 509 of one position
    (64, 8192, 152000, 2**30, 16),       # more rows than fit: a small chunk, never zero
    (4096, 64, 152000, 2**20, 1),
])
def test_auto_chunk_is_the_longest_divisor_within_the_budget(rows, seq_len, vocab, budget, want) -> None:
    chunk = auto_chunk(rows, seq_len, vocab, budget)
    assert chunk == want and seq_len % chunk == 0


def test_loss_chunk_for_counts_the_rows_of_one_device() -> None:
    assert steplib.loss_chunk_for(64, 8, 32, 1000, None) == 32  # given: at most the length
    assert steplib.loss_chunk_for(16, 8, 32, 1000, None) == 16
    vocab = AUTO_CHUNK_BYTES["cpu"] // (4 * 16 * 4)  # 16 rows x 4 positions fill the CPU budget
    one = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    assert steplib.loss_chunk_for(None, 16, 64, vocab, one) == 4
    eight = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])  # the batch over data x fsdp
    assert steplib.loss_chunk_for(None, 16, 64, vocab, eight) == 16


def test_step_with_the_chosen_chunk_equals_a_given_chunk() -> None:
    cfg = load_model_config("model/tiny")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(peak_lr=1e-3, end_lr=1e-4), 10)
    batch = {k: jax.device_put(v, batch_sharding(mesh, 2)) for k, v in _batch(seed=0).items()}
    losses = []
    for chunk in (None, 8):
        graphdef, state = steplib.init_state(create_model(cfg, mesh=mesh, seed=0), tx, mesh, seed=0)
        fn = steplib.compile_train_step(graphdef, jax.tree.map(lambda x: x.sharding, state), tx,
                                        lr_schedule(OptimConfig(), 10), accum=2, loss_chunk=chunk, mesh=mesh)
        losses.append(float(fn(state, batch)[1]["loss"]))
    assert steplib.loss_chunk_for(None, 4, 32, cfg.vocab_size, mesh) == 32  # tiny: one chunk, not 8 positions
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _model_loss(graphdef, params, batch) -> float:
    """Mean masked token loss with full logits (the model's own forward), for reference."""
    return float(jax.jit(lambda p, b: _model_loss_fn(graphdef, p, b))(params, batch))


def _model_loss_fn(graphdef, params, batch) -> jax.Array:
    model = steplib.merge_model(graphdef, params)
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def _run(mesh_cfg: MeshConfig, accum: int, steps: int = 2):
    cfg = load_model_config("model/tiny")
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    mesh = make_mesh(mesh_cfg, jax.devices()[:n])
    tx = make_optimizer(OptimConfig(peak_lr=1e-3, end_lr=1e-4, weight_decay=0.1), 10)
    graphdef, state = steplib.init_state(create_model(cfg, mesh=mesh, seed=0), tx, mesh, seed=0)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    fn = steplib.compile_train_step(graphdef, shardings, tx, lr_schedule(OptimConfig(), 10), accum=accum,
                                    loss_chunk=16, mesh=mesh)
    lowered = fn.lower(state, steplib.abstract_batch(8, 32, mesh))
    fn, kernel = lowered.compile(), "ditto_gemm" in lowered.as_text()
    history = []
    for i in range(steps):
        batch = {k: jax.device_put(v, batch_sharding(mesh, 2)) for k, v in _batch(seed=i).items()}
        ref = _model_loss(graphdef, state.params, batch)
        state, metrics = fn(state, batch)
        history.append((ref, {k: float(v) for k, v in metrics.items()}))
    return jax.device_get(state.params), history, shardings, kernel


def test_step_loss_is_the_masked_token_mean_and_invariant_to_accumulation_and_mesh() -> None:
    """One CPU device: the products run ``kernels.cpu.matmul``; eight: XLA's dots, the same numbers."""
    base, hist, _, kernel = _run(MeshConfig(data=1), accum=1)
    assert kernel == cpu_kernels.matmul_available()
    for ref, m in hist:
        assert m["loss"] == pytest.approx(ref, rel=1e-5)
        assert m["finite"] == 1.0 and m["grad_norm"] > 0
    assert hist[1][1]["loss"] < hist[0][0] + 1.0  # sane magnitude (~log vocab)
    for mesh_cfg, accum in [(MeshConfig(data=2, fsdp=2, tensor=2), 2)]:
        params, hist2, shardings, kernel = _run(mesh_cfg, accum)
        assert not kernel
        for (_, a), (_, b) in zip(hist, hist2):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["tokens"] == b["tokens"]
        diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), base, params))
        assert max(diffs) < 1e-6, (mesh_cfg, accum, max(diffs))
    # optimizer moments are sharded like their parameters
    mu = shardings.opt_state[1][0].mu
    assert mu["embed_tokens"].spec == shardings.params["embed_tokens"].spec
    assert mu["layers"]["mlp"]["up_proj"]["kernel"].spec == shardings.params["layers"]["mlp"]["up_proj"]["kernel"].spec


def test_schedule_warmup_cosine_floor() -> None:
    cfg = OptimConfig(peak_lr=2e-6, end_lr=2e-7, warmup_fraction=0.1)
    s = lr_schedule(cfg, 300)
    assert float(s(0)) == 0.0
    assert float(s(30)) == pytest.approx(2e-6)
    assert float(s(15)) == pytest.approx(1e-6)
    assert float(s(300)) == pytest.approx(2e-7)
    values = [float(s(i)) for i in range(30, 301)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_skips_norms_and_biases() -> None:
    cfg = load_model_config("model/tiny").model_copy(update={"qkv_bias": True, "qk_norm": True,
                                                             "tie_word_embeddings": False})
    _, params = steplib.split_model(create_model(cfg, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1])))
    mask = decay_mask(params)
    assert mask["embed_tokens"] and mask["lm_head"]
    assert mask["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not mask["layers"]["self_attn"]["q_proj"]["bias"]
    assert not mask["layers"]["self_attn"]["q_norm"]["scale"]
    assert not mask["layers"]["input_layernorm"]["scale"] and not mask["norm"]
    # With zero gradients only decayed leaves move.
    tx = make_optimizer(OptimConfig(peak_lr=1e-2, end_lr=1e-2, warmup_fraction=0.0, weight_decay=0.5), 10)
    updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == jax.tree.map(lambda m: bool(m), mask)


def test_invalid_optim_values_are_rejected() -> None:
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="end_lr"):
        OptimConfig(peak_lr=1e-6, end_lr=1e-5)
    with pytest.raises(pydantic.ValidationError):
        OptimConfig(warmup_fraction=1.5)
    assert isinstance(make_optimizer(OptimConfig(clip_norm=None), 5), optax.GradientTransformation)
