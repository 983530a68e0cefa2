"""Engines over models of one structure share compiled executables; their outputs stay their own model's."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

from ditto_jax.mesh import MeshConfig, make_mesh
from ditto_jax.model import ModelConfig, create_model
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams
from ditto_jax.sampling.sampler import clear_shared_step_functions

CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
NUCLEUS = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1, max_new_tokens=6, seed=3)
ENGINE = dict(batch_size=2, max_len=32, min_bucket=32, chunk=4)  # one bucket: prefill groups of 1 and 2


@contextlib.contextmanager
def backend_compiles():
    """Counts every XLA compilation in the block (``n[0]``), whatever jitted function asked for it."""
    n = [0]

    def listener(event: str, _secs: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _requests():
    rng = np.random.RandomState(0)
    return [Request(f"r{i}", rng.randint(3, 128, n).tolist(), NUCLEUS) for i, n in enumerate([3, 20, 9, 25])]


def _run(engine):
    out = {r.id: r for r in engine.generate(_requests())}
    return {k: (r.output_ids, r.logprobs) for k, r in sorted(out.items())}


@pytest.fixture(scope="module")
def models():
    return create_model(CFG, seed=0), create_model(CFG, seed=1)


def test_second_engine_compiles_nothing_and_gives_its_own_models_outputs(models):
    clear_shared_step_functions()
    model_a, model_b = models
    first = SamplingEngine(model_a, None, **ENGINE)
    out_a = _run(first)
    warm = first.compile_count()
    assert warm >= 2  # decode + prefill (groups of 2, maybe 1)

    with backend_compiles() as compiled:
        second = SamplingEngine(model_b, None, **ENGINE)
        out_b = _run(second)
    assert compiled[0] == 0 and second.compile_count() == warm
    assert second.sampler._steps is first.sampler._steps

    private = SamplingEngine(model_b, None, **ENGINE, share_compiled=False)
    assert private.sampler._steps is not first.sampler._steps
    assert _run(private) == out_b  # same weights and seeds: shared executables give the unshared engine's output
    assert out_b != out_a  # ... and the second engine samples its own weights, not the first's
    # nor did the second engine's weights leak into the first. Its prompts now come from its prefix cache
    # (seen twice), a different summation order: the same tokens, log-probabilities equal to float rounding.
    again = _run(first)
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in out_a.items()}
    assert all(np.allclose(again[k][1], out_a[k][1], atol=1e-5) for k in out_a)


def test_only_equal_structures_and_configs_share(models):
    clear_shared_step_functions()
    model_a, model_b = models

    def steps(model, mesh=None, **kw):
        return SamplingEngine(model, None, mesh=mesh, **(ENGINE | kw)).sampler._steps

    base = steps(model_a)
    assert steps(model_b) is base
    # an explicit head_dim equal to hidden_size / num_heads is the same model (a Hugging Face export spells it out)
    spelled = create_model(CFG.model_copy(update={"head_dim": 8}), seed=2)
    assert steps(spelled) is base
    # another structure; the same shapes computing something else
    for cfg in (CFG.model_copy(update={"num_layers": 3}), CFG.model_copy(update={"rope_theta": 500.0})):
        assert steps(create_model(cfg, seed=0)) is not base, cfg
    for kw in ({"max_len": 64}, {"batch_size": 4}, {"chunk": 8}, {"max_top_k": 32}, {"decode_path": "model"}):
        assert steps(model_a, **kw) is not base, kw
    if jax.device_count() >= 2:
        mesh = make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
        model = create_model(CFG, mesh=mesh, seed=0)
        sharded = steps(model, mesh)
        assert sharded is not base
        assert steps(model, mesh) is sharded
