"""Flash attention (forward and gradients) against the float64 XLA reference, in the CPU interpreters.

Every case compiles once (forward + VJP in one jit), so the cases are few and each covers several awkward
features: S not a block multiple, Sq != Sk (both ways), GQA 8/1, segment pairs with a whole row masked, one
segment per token, a single token, D = 32/64/128, float32 and bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditto_jax.kernels import BlockSizes, flash_attention
from ditto_jax.kernels._common import FlashProblem, kv_range, q_range
from ditto_jax.kernels._config import BLOCKS_ENV, default_blocks, parse_backend_spec, resolve_backend
from ditto_jax.kernels.reference import attention_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(b, sq, sk, hq, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, sq, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, sk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, sk, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, sq, hq, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _rel_err(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-12))


def _kernel_and_grads(q, k, v, do, *, causal, segment_ids, backend, blocks):
    @jax.jit
    def run(q, k, v, do, seg):
        f = lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg,  # noqa: E731
                                            backend=backend, block_sizes=blocks)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    o, grads = run(q, k, v, do, segment_ids)
    return o, grads


def _reference_and_grads(q, k, v, do, *, causal, segment_ids):
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do)]
        f = lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=segment_ids)  # noqa: E731

        @jax.jit  # one program, not one per operation: the suite's time is compiling
        def run(q, k, v, do):
            o, vjp = jax.vjp(f, q, k, v)
            return o, vjp(do)

        o, grads = run(*args)
        return np.asarray(o), [np.asarray(g) for g in grads]


def check_against_reference(backend, blocks, b, sq, sk, hq, hkv, d, dtype, causal, segment_ids=None, seed=0):
    """Forward and dq/dk/dv within the dtype's tolerance of the float64 reference; returns the output."""
    q, k, v, do = _inputs(b, sq, sk, hq, hkv, d, dtype, seed)
    o, grads = _kernel_and_grads(q, k, v, do, causal=causal, segment_ids=segment_ids, backend=backend, blocks=blocks)
    o_ref, grads_ref = _reference_and_grads(q, k, v, do, causal=causal, segment_ids=segment_ids)
    assert o.shape == q.shape and o.dtype == q.dtype
    for name, x, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref)):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{name} has non-finite values"
        err = _rel_err(x, ref)
        if not np.any(ref):  # an exactly zero gradient (one token per segment): rounding noise against o's scale
            err = float(np.max(np.abs(np.asarray(x, np.float64)))) / float(np.max(np.abs(o_ref)))
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    return np.asarray(o, np.float32)


BLOCKS16 = BlockSizes(block_q=16, block_kv=16)

CASES = {
    # name: (b, sq, sk, hq, hkv, d, dtype, causal, segments)
    "gqa8to1_causal_d64_unaligned": (1, 40, 40, 8, 1, 64, jnp.float32, True, None),
    "prefill_sq_lt_sk_segment_pair": (2, 24, 40, 4, 2, 32, jnp.float32, True, "pair"),
    "sq_gt_sk_causal_empty_rows": (1, 40, 24, 2, 2, 32, jnp.float32, True, None),
    "one_segment_per_token_bf16": (1, 20, 20, 2, 2, 64, jnp.bfloat16, False, "per_token"),
    "single_token_d128": (1, 1, 1, 2, 1, 128, jnp.float32, True, None),
}


def _segments(kind, b, sq, sk):
    if kind is None:
        return None
    if kind == "per_token":
        return jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, sq))
    # Prefill chunk: the queries are the last sq positions; segment 9 exists only in q (a whole masked row).
    kv_ids = jnp.asarray([[1] * 15 + [2] * 25, [1] * 30 + [3] * 10], jnp.int32)[:, :sk]
    q_ids = kv_ids[:, sk - sq:].at[0, 5].set(9)
    return q_ids, kv_ids


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    b, sq, sk, hq, hkv, d, dtype, causal, seg = CASES[name]
    segment_ids = _segments(seg, b, sq, sk)
    o = check_against_reference("interpret", BLOCKS16, b, sq, sk, hq, hkv, d, dtype, causal, segment_ids)
    if seg == "pair":
        assert np.all(o[0, 5] == 0.0), "a query whose segment has no key must give zeros"
    if name == "sq_gt_sk_causal_empty_rows":
        assert np.all(o[:, :16] == 0.0), "queries before the first key (Sq > Sk, causal) must give zeros"


def test_tpu_lowering_interpret_matches_reference():
    """The Mosaic TPU kernels (fwd, dq, dk/dv) through the TPU interpreter: causal, GQA, segments, padding."""
    seg = jnp.asarray([[1] * 12 + [2] * 28], jnp.int32)
    check_against_reference("tpu_interpret", BlockSizes(block_q=32, block_kv=32), 1, 40, 40, 2, 1, 32,
                            jnp.float32, True, seg)


def test_causal_block_ranges_skip_masked_blocks():
    """Causal: query block i visits kv blocks [0, i] and only the diagonal one is masked; dk/dv mirror it."""
    p = FlashProblem(sq=256, sk=256, sq_pad=256, sk_pad=256, num_q_heads=1, num_kv_heads=1, head_dim=64,
                     causal=True, sm_scale=1.0, has_segments=False)
    assert [tuple(int(x) for x in kv_range(p, i, 64, 64)) for i in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [tuple(int(x) for x in q_range(p, j, 64, 64)) for j in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # Chunked prefill (Sq < Sk): the 64 queries sit at positions 192..255, so they see all 4 kv blocks.
    p2 = FlashProblem(sq=64, sk=256, sq_pad=64, sk_pad=256, num_q_heads=1, num_kv_heads=1, head_dim=64,
                      causal=True, sm_scale=1.0, has_segments=False)
    assert tuple(int(x) for x in kv_range(p2, 0, 64, 64)) == (3, 4)
    # A padded kv tail must be masked: the last block moves to the masked range.
    p3 = FlashProblem(sq=100, sk=100, sq_pad=128, sk_pad=128, num_q_heads=1, num_kv_heads=1, head_dim=64,
                      causal=False, sm_scale=1.0, has_segments=False)
    assert tuple(int(x) for x in kv_range(p3, 0, 64, 64)) == (1, 2)


def test_block_env_override_and_errors(monkeypatch):
    monkeypatch.setenv(BLOCKS_ENV, "block_q=32,num_warps=4")
    blocks = default_blocks("triton")
    assert (blocks.block_q, blocks.num_warps) == (32, 4)
    monkeypatch.setenv(BLOCKS_ENV, "block_z=32")
    with pytest.raises(ValueError, match="block_z"):
        default_blocks("triton")
    assert resolve_backend("auto") == "interpret"  # CPU
    with pytest.raises(ValueError, match="not in"):
        resolve_backend("cuda")


def test_bad_inputs_name_the_tensor():
    q = jnp.zeros((1, 8, 4, 32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, jnp.zeros((1, 8, 3, 32)), jnp.zeros((1, 8, 3, 32)))
    with pytest.raises(ValueError, match="segment ids"):
        flash_attention(q, q, q, segment_ids=(jnp.zeros((1, 7), jnp.int32), jnp.zeros((1, 8), jnp.int32)),
                        backend="interpret")


def test_mosaic_gpu_kernel_in_gpu_interpreter():
    """The Hopper kernel's pipeline (TMA ring, barriers, causal ranges, padding, GQA) in the GPU interpreter.

    The interpreter lacks transposed/register wgmma operands and the consumer ping-pong barrier, so those
    two matmuls run as plain dots here; everything else is the GPU code path (forward; the backward pass is
    the Triton kernels, tested above).
    """
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (1, 100, 2, 64), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 130, 1, 64), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 130, 1, 64), jnp.float32).astype(jnp.bfloat16)
    o = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="mosaic_gpu_interpret",
                                                block_sizes=BlockSizes(block_q=64, block_kv=64,
                                                                       max_concurrent_steps=2)))(q, k, v)
    ref = jax.jit(lambda *a: attention_reference(*(x.astype(jnp.float32) for x in a), causal=True))(q, k, v)
    assert _rel_err(o.astype(jnp.float32), ref) <= TOL[jnp.bfloat16]


@pytest.mark.parametrize("backend,platform,segmented", [
    ("triton", "cuda", True), ("mosaic_gpu", "cuda", False), ("mosaic_gpu@mgpu_bwd=1", "cuda", True),
    ("mosaic_gpu@mgpu_bwd=1", "cuda", False), ("mosaic_tpu", "tpu", True)])
def test_device_lowerings_build(backend, platform, segmented):
    """Forward and backward lower for the real devices (cross-platform export; compiling needs the chip)."""
    from jax import export

    q = jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1000), jnp.int32)
    name, blocks = parse_backend_spec(backend)

    def fwd_bwd(q, k, v, seg):
        fn = lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=seg if segmented else None,  # noqa: E731
                                             backend=name, block_sizes=blocks)
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(o)

    checks = [export.DisabledSafetyCheck.custom_call(n)
              for n in ("__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2")]
    exported = export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)(q, k, k, seg)
    assert exported.out_avals[0].shape == q.shape
    if backend.startswith("mosaic_gpu@mgpu_bwd=1"):
        assert "triton" not in exported.mlir_module(), "the Mosaic GPU backward must not fall back to Triton"


def test_mosaic_gpu_self_check_runs_concretely_under_a_callers_trace():
    """The self-check is first reached while the model's jit traces; it must still compute concrete values
    (on an H200 it once failed with a ConcretizationTypeError and silently fell back to Triton)."""
    from ditto_jax.kernels.flash_attention import mosaic_gpu_self_check

    mosaic_gpu_self_check.cache_clear()
    seen = {}

    @jax.jit
    def traced(x):
        seen["reason"] = mosaic_gpu_self_check(64, "bfloat16")
        return x

    traced(jnp.ones(2))
    reason = seen["reason"] or ""
    assert "Concretization" not in reason and "Tracer" not in reason, reason
    if jax.default_backend() == "cpu":  # CPU cannot run Mosaic GPU: the check must say so, concretely
        assert reason.startswith("ValueError"), reason
