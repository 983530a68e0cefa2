"""Split-K decode attention against the XLA reference (generic and TPU interpreters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditto_jax.kernels import DecodeBlockSizes, decode_attention
from ditto_jax.kernels.decode_attention import choose_num_splits, combine_partials
from ditto_jax.kernels.reference import decode_reference


@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
def test_decode_matches_reference_at_lengths_1_mid_full_and_zero(backend):
    b, s, hq, hkv, d = 4, 48, 8, 1, 32  # GQA 8/1; 3 splits of 2 blocks of 8 rows
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, hq, d))
    k = jax.random.normal(ks[1], (b, s, hkv, d))
    v = jax.random.normal(ks[2], (b, s, hkv, d))
    lengths = jnp.asarray([1, 21, s, 0], jnp.int32)
    blocks = DecodeBlockSizes(block_kv=8 if backend == "interpret" else 16, num_splits=3)
    o = jax.jit(lambda *a: decode_attention(*a, backend=backend, block_sizes=blocks))(q, k, v, lengths)
    with jax.enable_x64(True):
        ref = decode_reference(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)), lengths)
    err = np.max(np.abs(np.asarray(o[:3], np.float64) - np.asarray(ref[:3]))) / np.max(np.abs(np.asarray(ref)))
    assert err <= 1e-5, err
    assert np.all(np.asarray(o[3]) == 0.0), "an empty cache row gives zeros"
    np.testing.assert_allclose(np.asarray(o[0]), np.asarray(v[0, 0, 0])[None].repeat(hq, 0), rtol=1e-5, atol=1e-6)


def test_combine_partials_ignores_empty_splits():
    acc = jnp.asarray([[[[2.0]], [[0.0]]]])  # [B=1, ns=2, H=1, D=1]
    m = jnp.asarray([[[0.0], [-1e30]]])
    l = jnp.asarray([[[4.0], [0.0]]])
    assert float(combine_partials(acc, m, l)[0, 0, 0]) == pytest.approx(0.5)


def test_split_choice_fills_gpu_and_respects_block_count():
    assert choose_num_splits(32, 8, 64, "triton") == 4  # 32*8*4 = 1024 programs
    assert choose_num_splits(1, 1, 3, "triton") == 3
    assert choose_num_splits(8, 8, 64, "mosaic_tpu") == 1


def test_decode_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(jnp.zeros((2, 4, 8)), jnp.zeros((2, 16, 2, 8)), jnp.zeros((2, 16, 2, 8)), jnp.zeros((3,)))
