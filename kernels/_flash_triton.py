"""Flash attention for the Pallas Triton lowering (any CUDA/ROCm GPU), also run by the generic interpreter.

Layout stays ``[B, S, H, D]`` (no transposes): a program owns one (query block, batch, head) in the forward
and dq kernels, and one (kv block, batch, kv head) in the dk/dv kernel, which walks all query heads of its
GQA group so dk/dv are summed in registers, never materialised per query head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ditto_jax.kernels._common import MASK, FlashProblem, block_mask, dot, finalize, kv_range, q_range
from ditto_jax.kernels._config import BlockSizes


def _compiler_params(num_warps: int | None, num_stages: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (deprecated backend: its import warns; only when lowering for Triton)

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _seg_tiles(qseg_ref, kvseg_ref, q_sl, kv_sl):
    if qseg_ref is None:
        return None, None
    return qseg_ref[q_sl][:, None], kvseg_ref[kv_sl][None, :]


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *, p: FlashProblem, bq: int, bk: int):
    i = pl.program_id(0)
    q = q_ref[...]
    d = q.shape[-1]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]
    acc_t = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

    def body(j, carry, masked):
        acc, m, l = carry
        kv_sl = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[kv_sl, :]
        s = dot(q, k, trans_b=True) * p.scale_log2
        if masked:
            kvseg = None if kvseg_ref is None else kvseg_ref[kv_sl][None, :]
            mask = block_mask(p, i * bq, j * bk, bq, bk, qseg, kvseg)
            if mask is not None:
                s = jnp.where(mask, s, MASK)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        pr = jnp.exp2(s - m_new[:, None])
        l = l * alpha + pr.sum(axis=1)
        v = v_ref[kv_sl, :]
        acc = acc * alpha[:, None] + dot(pr.astype(v.dtype), v)
        return acc, m_new, l

    mid, hi = kv_range(p, i, bq, bk)
    carry = (jnp.zeros((bq, d), acc_t), jnp.full((bq,), MASK, acc_t), jnp.zeros((bq,), acc_t))
    carry = lax.fori_loop(0, mid, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)
    o, lse = finalize(*carry)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse.astype(lse_ref.dtype)


def flash_fwd(q, k, v, q_seg, kv_seg, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """Forward: ``(o [B,Sq_pad,Hq,D], lse [B,Hq,Sq_pad] float32)`` on padded inputs."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    bq, bk, g = blocks.block_q, blocks.block_kv, p.groups
    num_warps = blocks.num_warps or (4 if d <= 64 else 8)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, sk, None, d), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, sk, None, d), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
    ]
    args = [q, k, v]
    if p.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)), pl.BlockSpec((None, sk), lambda i, bb, h: (bb, 0))]
        args += [q_seg, kv_seg]
    lse_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

    def kernel(*refs):
        if p.has_segments:
            q_ref, k_ref, v_ref, qs, ks, o_ref, lse_ref = refs
        else:
            (q_ref, k_ref, v_ref, o_ref, lse_ref), qs, ks = refs, None, None
        _fwd_kernel(q_ref, k_ref, v_ref, qs, ks, o_ref, lse_ref, p=p, bq=bq, bk=bk)

    return pl.pallas_call(
        kernel,
        grid=(sq // bq, b, hq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, sq), lse_dtype)],
        compiler_params=_compiler_params(num_warps, blocks.num_stages, interpret),
        interpret=interpret,
        name="ditto_flash_fwd",
    )(*args)


# ---------------------------------------------------------------------------------------------- backward
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dq_ref, *,
               p: FlashProblem, bq: int, bk: int):
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]
    acc_t = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

    def body(j, dq, masked):
        kv_sl = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[kv_sl, :]
        v = v_ref[kv_sl, :]
        s = dot(q, k, trans_b=True) * p.scale_log2
        if masked:
            kvseg = None if kvseg_ref is None else kvseg_ref[kv_sl][None, :]
            mask = block_mask(p, i * bq, j * bk, bq, bk, qseg, kvseg)
            if mask is not None:
                s = jnp.where(mask, s, MASK)
        pr = jnp.exp2(s - lse)
        dp = dot(do, v, trans_b=True)
        ds = pr * (dp - delta)
        return dq + dot(ds.astype(k.dtype), k)

    mid, hi = kv_range(p, i, bq, bk)
    dq = jnp.zeros(q.shape, acc_t)
    dq = lax.fori_loop(0, mid, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(mid, hi, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * p.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref, *,
                p: FlashProblem, bq: int, bk: int):
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    kvseg = None if kvseg_ref is None else kvseg_ref[...][None, :]
    acc_t = jnp.float64 if k.dtype == jnp.float64 else jnp.float32
    lo, mid = q_range(p, j, bq, bk)
    nq = p.sq_pad // bq

    def body(t, carry, masked, g):
        dk, dv = carry
        q_sl = pl.ds(pl.multiple_of(t * bq, bq), bq)
        q = q_ref[q_sl, g, :]
        do = do_ref[q_sl, g, :]
        lse = lse_ref[g, q_sl][:, None]
        delta = delta_ref[g, q_sl][:, None]
        s = dot(q, k, trans_b=True) * p.scale_log2
        if masked:
            qseg = None if qseg_ref is None else qseg_ref[q_sl][:, None]
            mask = block_mask(p, t * bq, j * bk, bq, bk, qseg, kvseg, check_kv_len=False)
            if mask is not None:
                s = jnp.where(mask, s, MASK)
        pr = jnp.exp2(s - lse)
        dv = dv + dot(pr.astype(do.dtype), do, trans_a=True)
        dp = dot(do, v, trans_b=True)
        ds = pr * (dp - delta)
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    def group(g, carry):
        carry = lax.fori_loop(lo, mid, functools.partial(body, masked=True, g=g), carry)
        return lax.fori_loop(mid, nq, functools.partial(body, masked=False, g=g), carry)

    carry = (jnp.zeros(k.shape, acc_t), jnp.zeros(v.shape, acc_t))
    dk, dv = lax.fori_loop(0, p.groups, group, carry) if p.groups > 1 else group(0, carry)
    dk_ref[...] = (dk * p.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """Backward: ``(dq, dk, dv)`` on padded inputs, from the residuals ``o`` and ``lse``."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = p.groups
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32)).astype(lse.dtype)
    num_warps = blocks.num_warps_bwd or (4 if d <= 64 else 8)
    params = _compiler_params(num_warps, blocks.num_stages_bwd or blocks.num_stages, interpret)

    # dq: grid over (query block, batch, query head)
    bq, bk = blocks.dq
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, sk, None, d), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, sk, None, d), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
    ]
    args = [q, k, v, do, lse, delta]
    if p.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)), pl.BlockSpec((None, sk), lambda i, bb, h: (bb, 0))]
        args += [q_seg, kv_seg]

    def dq_kernel(*refs):
        if p.has_segments:
            *ins, qs, ks, dq_ref = refs
        else:
            *ins, dq_ref = refs
            qs = ks = None
        _dq_kernel(*ins, qs, ks, dq_ref, p=p, bq=bq, bk=bk)

    dq = pl.pallas_call(
        dq_kernel,
        grid=(sq // bq, b, hq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bb, h: (bb, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="ditto_flash_dq",
    )(*args)

    # dk, dv: grid over (kv block, batch, kv head); each program walks the group's query heads
    bq, bk = blocks.dkv
    in_specs = [
        pl.BlockSpec((None, sq, g, d), lambda j, bb, h: (bb, 0, h, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bb, h: (bb, j, h, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bb, h: (bb, j, h, 0)),
        pl.BlockSpec((None, sq, g, d), lambda j, bb, h: (bb, 0, h, 0)),
        pl.BlockSpec((None, g, sq), lambda j, bb, h: (bb, h, 0)),
        pl.BlockSpec((None, g, sq), lambda j, bb, h: (bb, h, 0)),
    ]
    args = [q, k, v, do, lse, delta]
    if p.has_segments:
        in_specs += [pl.BlockSpec((None, sq), lambda j, bb, h: (bb, 0)), pl.BlockSpec((None, bk), lambda j, bb, h: (bb, j))]
        args += [q_seg, kv_seg]

    def dkv_kernel(*refs):
        if p.has_segments:
            *ins, qs, ks, dk_ref, dv_ref = refs
        else:
            *ins, dk_ref, dv_ref = refs
            qs = ks = None
        _dkv_kernel(*ins, qs, ks, dk_ref, dv_ref, p=p, bq=bq, bk=bk)

    dk, dv = pl.pallas_call(
        dkv_kernel,
        grid=(sk // bk, b, hkv),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bk, None, d), lambda j, bb, h: (bb, j, h, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, bb, h: (bb, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="ditto_flash_dkv",
    )(*args)
    return dq, dk, dv
