"""Split-K decode attention for the Pallas Triton lowering (also run by the generic interpreter).

One program per (split, batch row, kv head): it loads the query rows of the whole GQA group once
(padded to at least 16 rows so the dots are legal tensor-core shapes), streams its share of the cache up to
the row's length, and writes an unnormalised partial output with its running max and sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ditto_jax.kernels._common import MASK, dot
from ditto_jax.kernels._config import DecodeBlockSizes


def decode_partials(q, k_cache, v_cache, lengths, *, scale_log2: float, blocks: DecodeBlockSizes,
                    num_splits: int, interpret: bool):
    """Partials ``(acc [B,ns,Hq,D], m [B,ns,Hq], l [B,ns,Hq])`` (float32, log2 domain)."""
    b, hq, d = q.shape
    s_len, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    gp = max(g, 1 if interpret else 16)
    gp = 1 << (gp - 1).bit_length()
    bk = blocks.block_kv
    nb_total = s_len // bk
    nbs = -(-nb_total // num_splits)  # blocks per split
    qg = q.reshape(b, hkv, g, d)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    lens = lengths.astype(jnp.int32).reshape(b, 1)

    def kernel(len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref):
        split = pl.program_id(0)
        length = len_ref[0]
        first = split * nbs
        n_blocks = jnp.clip(lax.div(length + (bk - 1), bk) - first, 0, nbs)
        qv = q_ref[...]

        def body(t, carry):
            acc, m, l = carry
            start = (first + t) * bk
            kv_sl = pl.ds(pl.multiple_of(start, bk), bk)
            s = dot(qv, k_ref[kv_sl, :], trans_b=True) * scale_log2
            kv_pos = start + lax.broadcasted_iota(jnp.int32, (gp, bk), 1)
            s = jnp.where(kv_pos < length, s, MASK)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            pr = jnp.exp2(s - m_new[:, None])
            v = v_ref[kv_sl, :]
            acc = acc * alpha[:, None] + dot(pr.astype(v.dtype), v)
            return acc, m_new, l * alpha + pr.sum(axis=1)

        init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), MASK, jnp.float32), jnp.zeros((gp,), jnp.float32))
        acc, m, l = lax.fori_loop(0, n_blocks, body, init)
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l

    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (deprecated backend: its import warns; only when lowering for Triton)

        params = pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_splits, b, hkv),
        in_specs=[
            pl.BlockSpec((None, 1), lambda s, bb, h: (bb, 0)),
            pl.BlockSpec((None, None, gp, d), lambda s, bb, h: (bb, h, 0, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda s, bb, h: (bb, 0, h, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda s, bb, h: (bb, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda s, bb, h: (bb, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda s, bb, h: (bb, s, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda s, bb, h: (bb, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, num_splits, hkv, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, hkv, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, hkv, gp), jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="ditto_decode_attention",
    )(lens, qg, k_cache, v_cache)
    acc = acc[:, :, :, :g].reshape(b, num_splits, hq, d)
    return acc, m[..., :g].reshape(b, num_splits, hq), l[..., :g].reshape(b, num_splits, hq)
