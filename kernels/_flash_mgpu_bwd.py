"""Flash attention backward for Hopper through Pallas Mosaic GPU (experimental, opt-in: ``mgpu_bwd=1``).

Two kernels, each with two consumer warpgroups (64 rows each) and one TMA producer warpgroup streaming a
ring of ``max_concurrent_steps`` stages:
- dq: a CTA owns 128 query rows of one head and streams K/V blocks (causal: only up to the diagonal);
- dk/dv: a CTA owns 128 kv rows of one kv head and streams (q, dO, lse, delta) blocks of every query head
  of its GQA group (causal: only from the diagonal on), so dk/dv are summed over the group in registers.

Segment ids ride along: the owned rows' ids stay in registers, the streamed blocks' ids come with them
through the ring. Same residual format as the other lowerings (``lse`` log2-domain ``[B,Hq,Sq_pad]``). The GPU interpreter
lacks transposed/register wgmma operands, so interpreted runs do those products as plain dots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ditto_jax.kernels._common import MASK, FlashProblem, kv_range, q_range
from ditto_jax.kernels._config import BlockSizes
from ditto_jax.kernels._mgpu_common import interpret_params, transposed

_DOT_NT = (((1,), (1,)), ((), ()))
_DOT_NN = (((1,), (0,)), ((), ()))


class _Ops:
    """Matmuls and layout casts that are wgmma on the GPU and plain dots in the interpreter."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def zeros(self, shape):
        return self.cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def vector(self, ref, dim):
        """A row (dim=1: one value per row) or column (dim=0) vector from shared memory."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(dim))

    def mm_nt(self, a_smem, b_smem, shape):
        """``a @ b.T`` into a fresh float32 accumulator (both operands in shared memory)."""
        if self.interpret:
            return lax.dot_general(a_smem[...], b_smem[...], _DOT_NT, preferred_element_type=jnp.float32)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, transposed(b_smem))
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def mm_acc(self, acc, a_regs, b_smem):
        """``acc + a @ b`` with ``a`` in registers, accumulated in place on the GPU."""
        if self.interpret:
            return acc + lax.dot_general(a_regs, b_smem[...], _DOT_NN, preferred_element_type=jnp.float32)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a_regs, b_smem)

        return pl.run_state(body)(plgpu.ACC.init(acc))


def _smem_tile(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _dq(q, k, v, do, lse, delta, segs, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    b, sq, hq, d = q.shape
    dtype = q.dtype
    bq, bk = blocks.dq
    nk = k.shape[1] // bk
    stages = max(1, min(blocks.max_concurrent_steps, nk))
    g = p.groups
    scale = p.scale_log2
    ops = _Ops(interpret)

    def kernel(*refs):
        if p.has_segments:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dq_ref, *scratch = refs
        else:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *scratch = refs
            qseg_ref = kvseg_ref = None
        q_s2, do_s2, lse_s2, delta_s2, qseg_s2, k_s, v_s, kvseg_s, in_bars, k_bars, v_bars, kvseg_bars, consumed = scratch
        bi, head, tile, wg = (lax.axis_index(n) for n in ("batch", "heads", "q_seq", "wg"))
        _, tile_hi = kv_range(p, tile * 2 + 1, bq, bk)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_s, do_s, lse_s, delta_s = q_s2.at[wg], do_s2.at[wg], lse_s2.at[wg], delta_s2.at[wg]
            q_block = tile * 2 + wg
            q_base = q_block * bq
            rows = (bi, pl.ds(q_base, bq), head)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_s, in_bars[0].at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_s, in_bars[1].at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, pl.ds(q_base, bq)], lse_s, in_bars[2].at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, pl.ds(q_base, bq)], delta_s, in_bars[3].at[wg])
            if p.has_segments:
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(q_base, bq)], qseg_s2.at[wg], in_bars[4].at[wg])
            for i in range(5 if p.has_segments else 4):
                plgpu.barrier_wait(in_bars[i].at[wg])
            q_ids = ops.vector(qseg_s2.at[wg], 1) if p.has_segments else None
            lse_v = ops.vector(lse_s, 1)
            delta_v = ops.vector(delta_s, 1)
            mid, hi = kv_range(p, q_block, bq, bk)

            def step(j, dq, masked):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_bars.at[slot])
                s = ops.mm_nt(q_s, k_s.at[slot], (bq, bk)) * scale
                if masked:
                    kv_pos = ops.iota((bq, bk), 1) + j * bk
                    keep = None
                    if p.causal:
                        keep = kv_pos <= ops.iota((bq, bk), 0) + (q_base + p.offset)
                    if p.kv_padded and not p.has_segments:
                        in_len = kv_pos < p.sk
                        keep = in_len if keep is None else keep & in_len
                    if p.has_segments:
                        plgpu.barrier_wait(kvseg_bars.at[slot])
                        kv_ids = ops.vector(kvseg_s.at[slot], 0)
                        same = (lax.broadcast_in_dim(q_ids, (bq, bk), [0])
                                == lax.broadcast_in_dim(kv_ids, (bq, bk), [1]))
                        keep = same if keep is None else keep & same
                    if keep is not None:
                        s = jnp.where(keep, s, MASK)
                pr = jnp.exp2(s - lax.broadcast_in_dim(lse_v, s.shape, [0]))
                plgpu.barrier_wait(v_bars.at[slot])
                dp = ops.mm_nt(do_s, v_s.at[slot], (bq, bk))
                ds = pr * (dp - lax.broadcast_in_dim(delta_v, dp.shape, [0]))
                dq = ops.mm_acc(dq, ds.astype(dtype), k_s.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return dq

            def drain(j, _):
                slot = lax.rem(j, jnp.int32(stages))
                if interpret:
                    plgpu.barrier_wait(k_bars.at[slot])
                    plgpu.barrier_wait(v_bars.at[slot])
                    if p.has_segments:
                        plgpu.barrier_wait(kvseg_bars.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])

            dq = ops.zeros((bq, d))
            dq = lax.fori_loop(0, mid, lambda j, c: step(j, c, False), dq)
            dq = lax.fori_loop(mid, hi, lambda j, c: step(j, c, True), dq)
            lax.fori_loop(hi, tile_hi, drain, None)
            q_s[...] = (dq * p.sm_scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(g))

            def load(j, slot):
                sl = (bi, pl.ds(j * bk, bk), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_s.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_s.at[slot], v_bars.at[slot])
                if p.has_segments:
                    plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, pl.ds(j * bk, bk)], kvseg_s.at[slot], kvseg_bars.at[slot])

            for i in range(stages):
                pl.when(i < tile_hi)(lambda i=i: load(i, i))

            @pl.loop(0, jnp.maximum(tile_hi - stages, 0))
            def _(j):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(consumed.at[slot])
                load(j + stages, slot)

            if interpret:
                @pl.loop(jnp.maximum(tile_hi - stages, 0), tile_hi)
                def _(j):
                    plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[
            _smem_tile((2, bq, d), dtype), _smem_tile((2, bq, d), dtype),
            plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.int32),
            _smem_tile((stages, bk, d), dtype), _smem_tile((stages, bk, d), dtype),
            plgpu.SMEM((stages, bk), jnp.int32),
            (plgpu.Barrier(num_barriers=2),) * 5,
            plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ],
        grid=(hq, sq // (2 * bq), b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k, v, do, lse, delta, *segs)


def _dkv(q, k, v, do, lse, delta, segs, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dtype = q.dtype
    bq, bk = blocks.dkv
    nq = sq // bq
    g = p.groups
    scale = p.scale_log2
    ops = _Ops(interpret)
    stages = max(1, min(blocks.max_concurrent_steps, nq * g))

    def kernel(*refs):
        if p.has_segments:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref, *scratch = refs
        else:
            q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *scratch = refs
            qseg_ref = kvseg_ref = None
        k_s2, v_s2, kvseg_s2, q_s, do_s, lse_s, delta_s, qseg_s, kv_bars, in_bars, consumed = scratch
        n_in = 5 if p.has_segments else 4
        bi, kv_head, tile, wg = (lax.axis_index(n) for n in ("batch", "heads", "kv_seq", "wg"))
        tile_lo, _ = q_range(p, tile * 2, bq, bk)  # the earlier kv block needs the most query blocks
        per_head = nq - tile_lo
        total = per_head * g

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            k_s, v_s = k_s2.at[wg], v_s2.at[wg]
            kv_block = tile * 2 + wg
            kv_base = kv_block * bk
            rows = (bi, pl.ds(kv_base, bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_s, kv_bars[0].at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_s, kv_bars[1].at[wg])
            if p.has_segments:
                plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, pl.ds(kv_base, bk)], kvseg_s2.at[wg], kv_bars[2].at[wg])
            for i in range(3 if p.has_segments else 2):
                plgpu.barrier_wait(kv_bars[i].at[wg])
            kv_ids = ops.vector(kvseg_s2.at[wg], 1) if p.has_segments else None
            lo, mid = q_range(p, kv_block, bq, bk)

            def wait_inputs(slot):
                for bar in in_bars[:n_in]:
                    plgpu.barrier_wait(bar.at[slot])

            def step(t, carry, h, masked):
                dk, dv = carry
                slot = lax.rem(h * per_head + (t - tile_lo), jnp.int32(stages))
                wait_inputs(slot)
                s_t = ops.mm_nt(k_s, q_s.at[slot], (bk, bq)) * scale  # [kv rows, q rows]
                keep = None
                if masked and p.causal:
                    q_pos = ops.iota((bk, bq), 1) + (t * bq + p.offset)
                    keep = ops.iota((bk, bq), 0) + kv_base <= q_pos
                if masked and p.has_segments:
                    q_ids = ops.vector(qseg_s.at[slot], 0)
                    same = (lax.broadcast_in_dim(kv_ids, (bk, bq), [0])
                            == lax.broadcast_in_dim(q_ids, (bk, bq), [1]))
                    keep = same if keep is None else keep & same
                if keep is not None:
                    s_t = jnp.where(keep, s_t, MASK)
                lse_c = ops.vector(lse_s.at[slot], 0)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse_c, s_t.shape, [1]))
                dv = ops.mm_acc(dv, p_t.astype(dtype), do_s.at[slot])
                dp_t = ops.mm_nt(v_s, do_s.at[slot], (bk, bq))
                delta_c = ops.vector(delta_s.at[slot], 0)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_c, dp_t.shape, [1]))
                dk = ops.mm_acc(dk, ds_t.astype(dtype), q_s.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return dk, dv

            def drain(t, h):
                slot = lax.rem(h * per_head + (t - tile_lo), jnp.int32(stages))
                # Waited for on the GPU too: a barrier's wait parity is tracked per thread, one flip per wait, and
                # these skipped blocks come in the middle of the stream (warpgroup 1's first block of every head,
                # causal). Without the wait its parity for that slot lags one phase: later waits return before
                # the TMA lands (the H200's "dk relative error 0.413", 2026-12-04) or, once the load already
                # landed, wait for the next one, which needs this warpgroup's release (the S=8192 hang).
                wait_inputs(slot)
                plgpu.barrier_arrive(consumed.at[slot])
                return h

            def head_loop(h, carry):
                lax.fori_loop(tile_lo, lo, drain, h)
                carry = lax.fori_loop(lo, mid, lambda t, c: step(t, c, h, True), carry)
                return lax.fori_loop(mid, nq, lambda t, c: step(t, c, h, False), carry)

            dk, dv = lax.fori_loop(0, g, head_loop, (ops.zeros((bk, d)), ops.zeros((bk, d))))
            k_s[...] = (dk * p.sm_scale).astype(dtype)
            v_s[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_s, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_s, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(step, slot):
                h = kv_head * g + lax.div(step, per_head)
                t = tile_lo + lax.rem(step, per_head)
                sl = (bi, pl.ds(t * bq, bq), h)
                plgpu.copy_gmem_to_smem(q_ref.at[sl], q_s.at[slot], in_bars[0].at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[sl], do_s.at[slot], in_bars[1].at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, pl.ds(t * bq, bq)], lse_s.at[slot], in_bars[2].at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[bi, h, pl.ds(t * bq, bq)], delta_s.at[slot],
                                        in_bars[3].at[slot])
                if p.has_segments:
                    plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(t * bq, bq)], qseg_s.at[slot], in_bars[4].at[slot])

            for i in range(stages):
                pl.when(i < total)(lambda i=i: load(jnp.int32(i), i))

            @pl.loop(0, jnp.maximum(total - stages, 0))
            def _(j):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(consumed.at[slot])
                load(j + stages, slot)

            if interpret:
                @pl.loop(jnp.maximum(total - stages, 0), total)
                def _(j):
                    plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])

    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
        scratch_types=[
            _smem_tile((2, bk, d), dtype), _smem_tile((2, bk, d), dtype), plgpu.SMEM((2, bk), jnp.int32),
            _smem_tile((stages, bq, d), dtype), _smem_tile((stages, bq, d), dtype),
            plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.int32),
            (plgpu.Barrier(num_barriers=2),) * 3,
            (plgpu.Barrier(num_barriers=stages),) * 5,
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ],
        grid=(hkv, sk // (2 * bk), b),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k, v, do, lse, delta, *segs)


def flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """``(dq, dk, dv)`` on padded ``[B,S,H,D]`` inputs from the residuals ``o`` and ``lse``."""
    bq, bk = blocks.dkv
    if blocks.dq[0] % 64 or blocks.dq[1] % 64 or bq % 64 or bk % 64:
        raise ValueError(f"mosaic_gpu backward: dq/dkv blocks must be multiples of 64, got {blocks}")
    if q.shape[1] % (2 * blocks.dq[0]) or k.shape[1] % (2 * bk):
        raise ValueError(f"mosaic_gpu backward: padded Sq={q.shape[1]} must divide by {2 * blocks.dq[0]} and "
                         f"Sk={k.shape[1]} by {2 * bk}")
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    segs = (q_seg, kv_seg) if p.has_segments else ()
    dq = _dq(q, k, v, do, lse, delta, segs, p, blocks, interpret)
    dk, dv = _dkv(q, k, v, do, lse, delta, segs, p, blocks, interpret)
    return dq, dk, dv
