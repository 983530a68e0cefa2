"""Split-K decode attention for Mosaic TPU (tested on CPU through the TPU interpreter).

The cache is viewed as ``[B, S, Hkv*D]`` (a free reshape), so a block holds every kv head of ``block_kv``
rows and each head is a lane-aligned slice; the grid is (batch, split, block-in-split) with the row lengths
prefetched to scalar memory: blocks past a row's length repeat the last block index (no DMA) and skip compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ditto_jax.kernels._common import MASK, dot
from ditto_jax.kernels._config import DecodeBlockSizes


def decode_partials(q, k_cache, v_cache, lengths, *, scale_log2: float, blocks: DecodeBlockSizes,
                    num_splits: int, interpret: bool):
    """Partials ``(acc [B,ns,Hq,D], m [B,ns,Hq], l [B,ns,Hq])`` (float32, log2 domain)."""
    b, hq, d = q.shape
    s_len, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    bk = blocks.block_kv
    nbs = -(-(s_len // bk) // num_splits)
    k2 = k_cache.reshape(b, s_len, hkv * d)
    v2 = v_cache.reshape(b, s_len, hkv * d)

    def kv_block(bb, s, t, lens_ref):
        last = jnp.maximum(lax.div(lens_ref[bb] + (bk - 1), bk) - 1, 0)
        return jnp.minimum(s * nbs + t, last)

    def kernel(lens_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, m_sc, l_sc, acc_sc):
        bb, s, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        length = lens_ref[bb]
        start = (s * nbs + t) * bk

        @pl.when(t == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when(start < length)
        def _step():
            kv_pos = start + lax.broadcasted_iota(jnp.int32, (g, bk), 1)
            for h in range(hkv):  # static: all heads of the block, each a lane-aligned slice
                rows = slice(h * g, (h + 1) * g)
                cols = slice(h * d, (h + 1) * d)
                sc = dot(q_ref[rows, :], k_ref[:, cols], trans_b=True) * scale_log2
                sc = jnp.where(kv_pos < length, sc, MASK)
                m_prev = m_sc[rows, :]
                m_new = jnp.maximum(m_prev, sc.max(axis=1, keepdims=True))
                alpha = jnp.exp2(m_prev - m_new)
                pr = jnp.exp2(sc - m_new)
                v = v_ref[:, cols]
                l_sc[rows, :] = l_sc[rows, :] * alpha + pr.sum(axis=1, keepdims=True)
                acc_sc[rows, :] = acc_sc[rows, :] * alpha + dot(pr.astype(v.dtype), v)
                m_sc[rows, :] = m_new

        @pl.when(t == nbs - 1)
        def _done():
            acc_ref[...] = acc_sc[...]
            m_ref[...] = m_sc[...]
            l_ref[...] = l_sc[...]

    kv_spec = pl.BlockSpec((None, bk, hkv * d), lambda bb, s, t, lens: (bb, kv_block(bb, s, t, lens), 0))
    out_row = lambda bb, s, t, lens: (bb, s, 0, 0)  # noqa: E731
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, num_splits, nbs),
            in_specs=[pl.BlockSpec((None, hq, d), lambda bb, s, t, lens: (bb, 0, 0)), kv_spec, kv_spec],
            out_specs=[pl.BlockSpec((None, None, hq, d), out_row), pl.BlockSpec((None, None, hq, 1), out_row),
                       pl.BlockSpec((None, None, hq, 1), out_row)],
            scratch_shapes=[pltpu.VMEM((hq, 1), jnp.float32), pltpu.VMEM((hq, 1), jnp.float32),
                            pltpu.VMEM((hq, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, num_splits, hq, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, num_splits, hq, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, num_splits, hq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ditto_decode_attention_tpu",
    )(lengths.astype(jnp.int32), q, k2, v2)
    return acc, m[..., 0], l[..., 0]
