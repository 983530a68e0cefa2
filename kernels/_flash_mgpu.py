"""Flash attention forward for Hopper through Pallas Mosaic GPU (TMA, wgmma, warp specialisation).

One CTA owns ``2 * block_q`` query rows of one (batch, head): two consumer warpgroups hold 64-row query
tiles, fp32 accumulators and the online-softmax state in registers; a producer warpgroup streams K and V
blocks through a ring of ``max_concurrent_steps`` shared-memory stages with TMA, each stage released by
"consumed" barriers. A schedule barrier ping-pongs the two consumers so one runs its softmax while the other
keeps the tensor cores busy (the FlashAttention-3 schedule). Causal blocks above the diagonal are never
loaded; the diagonal (and a padded kv tail) is masked in registers.

Scope: bf16/fp16, head dim a multiple of 64 (<= 256), causal with any Sq/Sk alignment, GQA, padded
lengths, segment ids (query ids stay in registers, kv ids ride the TMA ring with K). The backward pass is
the Triton dq and dk/dv kernels on the same residual format, or ``_flash_mgpu_bwd`` with ``mgpu_bwd=1``.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ditto_jax.kernels import _flash_mgpu_bwd, _flash_triton
from ditto_jax.kernels._common import MASK, FlashProblem, kv_range
from ditto_jax.kernels._config import BlockSizes
from ditto_jax.kernels._mgpu_common import interpret_params, transposed

_RCP_LN2 = 1.0 / math.log(2.0)


def supports(p: FlashProblem, dtype) -> bool:
    """Whether this kernel handles the problem (else use the Triton kernels)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and p.head_dim % 64 == 0 and p.head_dim <= 256)


def flash_fwd(q, k, v, q_seg, kv_seg, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """Forward on padded ``[B,S,H,D]`` inputs: ``(o, lse [B,Hq,Sq_pad] float32, log2 domain)``."""
    if not supports(p, q.dtype):
        return _flash_triton.flash_fwd(q, k, v, q_seg, kv_seg, p, _triton_blocks(blocks), interpret=interpret)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    dtype = q.dtype
    bq, bk = blocks.block_q, blocks.block_kv
    if bq % 64 or bk % 64:
        raise ValueError(f"mosaic_gpu flash attention: block_q ({bq}) and block_kv ({bk}) must be multiples of 64")
    if sq % (2 * bq) or sk % bk:
        raise ValueError(f"mosaic_gpu flash attention: padded Sq={sq} must divide by {2 * bq}, Sk={sk} by {bk}")
    nk = sk // bk
    stages = max(1, min(blocks.max_concurrent_steps, nk))
    g = p.groups
    scale = p.scale_log2
    masked_qk = MASK / scale  # a masked raw score; times `scale` it is MASK

    # The consumer ping-pong barrier; the GPU interpreter deadlocks on it, so interpreted runs go without.
    use_schedule = not interpret and os.environ.get("DITTO_MGPU_SCHEDULE", "1") == "1"

    def cast(x, layout):  # register layouts steer the GPU lowering; the interpreter has no such primitive
        return x if interpret else plgpu.layout_cast(x, layout)

    def row_vector(ref):  # one value per query row, in the layout of the wgmma accumulator's rows
        return ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))

    def column_vector(ref):  # one value per kv column
        return ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))

    def iota(dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (bq, bk), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=plgpu.Layout.WGMMA)

    def kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, smem, bars, consumed, schedule_barrier):
        qo_smem2, k_smem, v_smem, lse_smem2, qseg_smem2, kvseg_smem = smem
        k_bars, v_bars, q_bars, kvseg_bars = bars
        k_consumed, v_consumed = consumed
        bi = lax.axis_index("batch")
        head = lax.axis_index("heads")
        tile = lax.axis_index("q_seq")
        wg = lax.axis_index("wg")
        _, tile_hi = kv_range(p, tile * 2 + 1, bq, bk)  # the later warpgroup needs the most kv blocks

        def schedule():
            if use_schedule:
                plgpu.barrier_arrive(schedule_barrier)
                plgpu.barrier_wait(schedule_barrier)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            lse_smem = lse_smem2.at[wg]
            q_block = tile * 2 + wg
            q_base = q_block * bq
            mid, hi = kv_range(p, q_block, bq, bk)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_base, bq), head], qo_smem, q_bars.at[wg])
            plgpu.barrier_wait(q_bars.at[wg])
            q_ids = None
            if p.has_segments:
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(q_base, bq)], qseg_smem2.at[wg], q_bars.at[wg])
                plgpu.barrier_wait(q_bars.at[wg])
                q_ids = row_vector(qseg_smem2.at[wg])
            m_i = cast(jnp.full((bq,), MASK, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(hi > 0)
            def _():
                plgpu.barrier_wait(k_bars.at[0])

            pl.when(wg == 1)(schedule)

            def step(j, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(j, jnp.int32(stages))

                def qk_fn(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, transposed(k_smem.at[slot]))
                    schedule()
                    return acc_ref[...]

                kv_ids = None
                if p.has_segments:  # read before K's slot is released: the ids share it
                    plgpu.barrier_wait(kvseg_bars.at[slot])
                    kv_ids = column_vector(kvseg_smem.at[slot])
                if interpret:  # the GPU interpreter's wgmma takes no transposed operand: same product in registers
                    qk = lax.dot_general(qo_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
                    schedule()
                else:
                    qk = pl.run_scoped(qk_fn, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_consumed.at[slot])
                if masked:
                    rows = iota(0)
                    cols = iota(1)
                    kv_pos = cols + j * bk
                    keep = None
                    if p.causal:
                        keep = kv_pos <= rows + (q_base + p.offset)
                    if p.kv_padded and not p.has_segments:
                        in_len = kv_pos < p.sk
                        keep = in_len if keep is None else keep & in_len
                    if p.has_segments:
                        same = (lax.broadcast_in_dim(q_ids, (bq, bk), [0])
                                == lax.broadcast_in_dim(kv_ids, (bq, bk), [1]))
                        keep = same if keep is None else keep & same
                    if keep is not None:
                        qk = jnp.where(keep, qk, masked_qk)
                m_new = jnp.maximum(m_i, qk.max(axis=1) * scale)
                alpha = jnp.exp2(m_i - m_new)
                pr = jnp.exp2(qk * scale - lax.broadcast_in_dim(m_new, qk.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + pr.sum(axis=1)
                p16 = pr.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                if use_schedule:
                    plgpu.barrier_arrive(schedule_barrier)
                plgpu.barrier_wait(v_bars.at[slot])
                if use_schedule:
                    plgpu.barrier_wait(schedule_barrier)

                def wait_next_k():
                    nxt = j + 1

                    @pl.when(nxt < hi)
                    def _():
                        plgpu.barrier_wait(k_bars.at[lax.rem(nxt, jnp.int32(stages))])

                def pv_fn(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                if interpret:  # the interpreter has neither run_state nor register operands for wgmma
                    acc = acc + lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                    wait_next_k()
                else:  # accumulate in place in the wgmma registers
                    acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l_i

            def drain(j, _):
                # Blocks this warpgroup does not need (causal) still count as consumed for the producer.
                slot = lax.rem(j, jnp.int32(stages))
                if interpret:  # the interpreter insists every thread observes every phase of every barrier
                    plgpu.barrier_wait(k_bars.at[slot])
                    plgpu.barrier_wait(v_bars.at[slot])
                    if p.has_segments:
                        plgpu.barrier_wait(kvseg_bars.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                schedule()
                schedule()

            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(0, mid, lambda j, c: step(j, c, False), carry)
            acc, m_i, l_i = lax.fori_loop(mid, hi, lambda j, c: step(j, c, True), carry)
            lax.fori_loop(hi, tile_hi, drain, None)
            pl.when(wg == 0)(schedule)

            empty = m_i <= MASK / 2
            l_safe = jnp.where(empty, 1.0, l_i)
            inv = jnp.where(empty, 0.0, 1.0 / l_safe)
            acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem[...] = jnp.where(empty, -MASK, m_i + jnp.log(l_safe) * _RCP_LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[bi, pl.ds(q_base, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(q_base, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(g))
            for i in range(stages):
                @pl.when(i < tile_hi)
                def _():
                    sl = (bi, pl.ds(i * bk, bk), kv_head)
                    plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[i], k_bars.at[i])
                    plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[i], v_bars.at[i])
                    if p.has_segments:
                        plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, pl.ds(i * bk, bk)], kvseg_smem.at[i], kvseg_bars.at[i])

            @pl.loop(0, jnp.maximum(tile_hi - stages, 0))
            def _(j):
                nxt = j + stages
                slot = lax.rem(j, jnp.int32(stages))
                sl = (bi, pl.ds(nxt * bk, bk), kv_head)
                plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bars.at[slot])
                if p.has_segments:
                    plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, pl.ds(nxt * bk, bk)], kvseg_smem.at[slot],
                                            kvseg_bars.at[slot])
                plgpu.barrier_wait(v_consumed.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bars.at[slot])

            if interpret:  # observe the last consumptions too (the interpreter checks every phase is seen)
                @pl.loop(jnp.maximum(tile_hi - stages, 0), tile_hi)
                def _(j):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_consumed.at[slot])
                    plgpu.barrier_wait(v_consumed.at[slot])

    def entry(*refs):
        if p.has_segments:
            q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref = refs
        else:
            (q_ref, k_ref, v_ref, o_ref, lse_ref), qseg_ref, kvseg_ref = refs, None, None
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bk, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bk, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((2, bq), jnp.int32),
            plgpu.SMEM((stages, bk), jnp.int32),
        )
        pl.run_scoped(
            lambda smem_refs, bars, consumed, sched: kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref,
                                                            smem_refs, bars, consumed, sched),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, sq), jnp.float32)],
        grid=(hq, sq // (2 * bq), b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k, v, *((q_seg, kv_seg) if p.has_segments else ()))
    return o, lse


def _triton_blocks(blocks: BlockSizes) -> BlockSizes:
    """Triton tiles for the passes this module delegates (backward, segment ids)."""
    return blocks.replace(block_q=min(blocks.block_q, 64), block_kv=min(blocks.block_kv, 64),
                          num_warps_bwd=blocks.num_warps_bwd or 8, num_stages_bwd=blocks.num_stages_bwd or 2)


def flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p: FlashProblem, blocks: BlockSizes, interpret: bool):
    """Backward: the Mosaic GPU kernels when ``blocks.mgpu_bwd`` (experimental), else the Triton dq and
    dk/dv kernels (same residual format)."""

    if blocks.mgpu_bwd and supports(p, q.dtype):
        return _flash_mgpu_bwd.flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p, blocks, interpret)

    return _flash_triton.flash_bwd(q, k, v, q_seg, kv_seg, o, lse, do, p, _triton_blocks(blocks), interpret=interpret)
