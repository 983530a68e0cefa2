"""Flash attention for Mosaic TPU (tested on CPU through the TPU interpreter).

The kernels see ``[B, H, S, D]`` tiles (the wrapper transposes, so every block's two minor dims are
``(rows, D)``), walk the kv (or query) axis as the last, sequential grid dimension with float32 accumulators
in VMEM scratch, and skip fully-masked causal blocks twice: the index map repeats the previous block (no
DMA is issued) and ``pl.when`` skips the compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ditto_jax.kernels._common import MASK, FlashProblem, block_mask, dot, finalize, kv_range, q_range
from ditto_jax.kernels._config import BlockSizes


def _params(interpret: bool, semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _bhsd(x):
    return jnp.swapaxes(x, 1, 2)


def _seg_inputs(q_seg, kv_seg):
    return q_seg[:, :, None], kv_seg[:, None, :]


# ----------------------------------------------------------------------------------------------- forward
def flash_fwd(q, k, v, q_seg, kv_seg, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """Forward on padded ``[B,S,H,D]`` inputs: ``(o, lse [B,Hq,Sq_pad])``."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    bq, bk, g = blocks.block_q, blocks.block_kv, p.groups
    nq, nk = sq // bq, sk // bk

    def kv_block(i, j):
        _, hi = kv_range(p, i, bq, bk)
        return jnp.minimum(j, jnp.maximum(hi - 1, 0))

    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda bb, h, i, j: (bb, h, i, 0)),
        pl.BlockSpec((None, None, bk, d), lambda bb, h, i, j: (bb, lax.div(h, g), kv_block(i, j), 0)),
        pl.BlockSpec((None, None, bk, d), lambda bb, h, i, j: (bb, lax.div(h, g), kv_block(i, j), 0)),
    ]
    args = [_bhsd(q), _bhsd(k), _bhsd(v)]
    if p.has_segments:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda bb, h, i, j: (bb, i, 0)),
                     pl.BlockSpec((None, 1, bk), lambda bb, h, i, j: (bb, 0, kv_block(i, j)))]
        args += list(_seg_inputs(q_seg, kv_seg))

    def kernel(*refs):
        if p.has_segments:
            q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        else:
            q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
            qs_ref = ks_ref = None
        i, j = pl.program_id(2), pl.program_id(3)
        mid, hi = kv_range(p, i, bq, bk)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, MASK, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        def step(masked: bool):
            s = dot(q_ref[...], k_ref[...], trans_b=True) * p.scale_log2
            if masked:
                qs = None if qs_ref is None else qs_ref[...]
                ks = None if ks_ref is None else ks_ref[...]
                mask = block_mask(p, i * bq, j * bk, bq, bk, qs, ks)
                if mask is not None:
                    s = jnp.where(mask, s, MASK)
            m_prev = m_sc[...]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            alpha = jnp.exp2(m_prev - m_new)
            pr = jnp.exp2(s - m_new)
            l_sc[...] = l_sc[...] * alpha + pr.sum(axis=1, keepdims=True)
            v = v_ref[...]
            acc_sc[...] = acc_sc[...] * alpha + dot(pr.astype(v.dtype), v)
            m_sc[...] = m_new

        pl.when(j < mid)(lambda: step(False))
        pl.when((j >= mid) & (j < hi))(lambda: step(True))

        @pl.when(j == nk - 1)
        def _done():
            o, lse = finalize(acc_sc[...], m_sc[...][:, 0], l_sc[...][:, 0])
            o_ref[...] = o.astype(o_ref.dtype)
            lse_ref[...] = lse[:, None]

    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, hq, nq, nk),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, d), lambda bb, h, i, j: (bb, h, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda bb, h, i, j: (bb, h, i, 0)),
            ],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, hq, sq, d), q.dtype), jax.ShapeDtypeStruct((b, hq, sq, 1), jnp.float32)],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="ditto_flash_fwd_tpu",
    )(*args)
    return _bhsd(o), lse[..., 0]


# ---------------------------------------------------------------------------------------------- backward
def flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """Backward on padded ``[B,S,H,D]`` inputs: ``(dq, dk, dv)``."""
    b, sq, hq, d = q.shape
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    lse4 = lse[..., None]
    qt, kt, vt, dot_ = _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(do)
    segs = list(_seg_inputs(q_seg, kv_seg)) if p.has_segments else []
    dq = _dq(qt, kt, vt, dot_, lse4, delta, segs, p, *blocks.dq, interpret)
    dk, dv = _dkv(qt, kt, vt, dot_, lse4, delta, segs, p, *blocks.dkv, interpret)
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


def _dq(q, k, v, do, lse, delta, segs, p: FlashProblem, bq: int, bk: int, interpret: bool):
    b, hq, sq, d = q.shape
    g = p.groups
    nq, nk = sq // bq, k.shape[2] // bk

    def kv_block(i, j):
        _, hi = kv_range(p, i, bq, bk)
        return jnp.minimum(j, jnp.maximum(hi - 1, 0))

    row = lambda bb, h, i, j: (bb, h, i, 0)  # noqa: E731
    kv = lambda bb, h, i, j: (bb, lax.div(h, g), kv_block(i, j), 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, bq, d), row), pl.BlockSpec((None, None, bk, d), kv),
                pl.BlockSpec((None, None, bk, d), kv), pl.BlockSpec((None, None, bq, d), row),
                pl.BlockSpec((None, None, bq, 1), row), pl.BlockSpec((None, None, bq, 1), row)]
    if segs:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda bb, h, i, j: (bb, i, 0)),
                     pl.BlockSpec((None, 1, bk), lambda bb, h, i, j: (bb, 0, kv_block(i, j)))]

    def kernel(*refs):
        if segs:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref, acc = refs
        else:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc = refs
            qs_ref = ks_ref = None
        i, j = pl.program_id(2), pl.program_id(3)
        mid, hi = kv_range(p, i, bq, bk)

        @pl.when(j == 0)
        def _init():
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

        def step(masked: bool):
            k_t = k_ref[...]
            s = dot(q_ref[...], k_t, trans_b=True) * p.scale_log2
            if masked:
                qs = None if qs_ref is None else qs_ref[...]
                ks = None if ks_ref is None else ks_ref[...]
                mask = block_mask(p, i * bq, j * bk, bq, bk, qs, ks)
                if mask is not None:
                    s = jnp.where(mask, s, MASK)
            pr = jnp.exp2(s - lse_ref[...])
            dp = dot(do_ref[...], v_ref[...], trans_b=True)
            ds = pr * (dp - delta_ref[...])
            acc[...] += dot(ds.astype(k_t.dtype), k_t)

        pl.when(j < mid)(lambda: step(False))
        pl.when((j >= mid) & (j < hi))(lambda: step(True))

        @pl.when(j == nk - 1)
        def _done():
            dq_ref[...] = (acc[...] * p.sm_scale).astype(dq_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, hq, nq, nk), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), row),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="ditto_flash_dq_tpu",
    )(q, k, v, do, lse, delta, *segs)


def _dkv(q, k, v, do, lse, delta, segs, p: FlashProblem, bq: int, bk: int, interpret: bool):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = p.groups
    nq, nk = sq // bq, sk // bk

    def q_block(j, t):
        lo, _ = q_range(p, j, bq, bk)
        return jnp.maximum(lax.rem(t, nq), jnp.minimum(lo, nq - 1))

    row = lambda bb, h, j, t: (bb, h * g + lax.div(t, nq), q_block(j, t), 0)  # noqa: E731
    kv = lambda bb, h, j, t: (bb, h, j, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, bq, d), row), pl.BlockSpec((None, None, bk, d), kv),
                pl.BlockSpec((None, None, bk, d), kv), pl.BlockSpec((None, None, bq, d), row),
                pl.BlockSpec((None, None, bq, 1), row), pl.BlockSpec((None, None, bq, 1), row)]
    if segs:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda bb, h, j, t: (bb, q_block(j, t), 0)),
                     pl.BlockSpec((None, 1, bk), lambda bb, h, j, t: (bb, 0, j))]

    def kernel(*refs):
        if segs:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
        else:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
            qs_ref = ks_ref = None
        j, t_all = pl.program_id(2), pl.program_id(3)
        t = lax.rem(t_all, nq)
        lo, mid = q_range(p, j, bq, bk)

        @pl.when(t_all == 0)
        def _init():
            dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
            dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

        def step(masked: bool):
            q_t, do_t = q_ref[...], do_ref[...]
            s = dot(q_t, k_ref[...], trans_b=True) * p.scale_log2
            if masked:
                qs = None if qs_ref is None else qs_ref[...]
                ks = None if ks_ref is None else ks_ref[...]
                mask = block_mask(p, t * bq, j * bk, bq, bk, qs, ks, check_kv_len=False)
                if mask is not None:
                    s = jnp.where(mask, s, MASK)
            pr = jnp.exp2(s - lse_ref[...])
            dv_acc[...] += dot(pr.astype(do_t.dtype), do_t, trans_a=True)
            dp = dot(do_t, v_ref[...], trans_b=True)
            ds = pr * (dp - delta_ref[...])
            dk_acc[...] += dot(ds.astype(q_t.dtype), q_t, trans_a=True)

        pl.when((t >= lo) & (t < mid))(lambda: step(True))
        pl.when(t >= mid)(lambda: step(False))

        @pl.when(t_all == g * nq - 1)
        def _done():
            dk_ref[...] = (dk_acc[...] * p.sm_scale).astype(dk_ref.dtype)
            dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, hkv, nk, g * nq), in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, d), kv), pl.BlockSpec((None, None, bk, d), kv)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="ditto_flash_dkv_tpu",
    )(q, k, v, do, lse, delta, *segs)
