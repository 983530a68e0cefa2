"""Tiling sweep of the attention kernels: the variants a GPU lease tries, their shared-memory footprint, and
the summary that turns a sweep into "best variant per pass" against cuDNN and the kernel goals.

Used by ``ditto-jax bench kernels --impls tune --decode-impls tune`` (and the ``kernels_tune`` section of
``scripts/gpu_check.py``). Goals (issue 3, at [B=2, S=8192, H=16, D=128] bf16 and decode B=32, cache 8192,
Hq/Hkv=32/8, D=128): forward >= 1.0x cuDNN, backward >= 516 TFLOP/s (issue 18), decode >= 80% of the copy bandwidth.

Each variant changes forward tiles and backward tiles at once (the two passes read disjoint fields of
``BlockSizes``), so every variant gives one forward and one backward data point; the best forward tiles and
the best backward tiles are then combined into one spec and, with ``--confirm-best``, measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GOAL_FWD_X_CUDNN = 1.0
GOAL_BWD_TFLOPS = 516.0  # issue 18 (was 440 in issue 3)
GOAL_DECODE_PCT_COPY = 80.0
# Shared memory one thread block may use on H100/H200 (228 KB per SM, 1 KB of it reserved by CUDA).
SMEM_LIMIT_BYTES = 227 * 1024
# What the Mosaic GPU lowering allocates beyond a kernel's own buffers (alignment, barriers, Pallas scratch):
# 2.5-3.9 KB in the three over-limit configurations lowered for cuda on CPU.
MOSAIC_OVERHEAD_BYTES = 4096

# Fields each pass reads. ``max_concurrent_steps`` (the Mosaic GPU TMA ring depth) is read by the forward
# and by the Mosaic GPU backward; a combined spec keeps the forward's.
FWD_FIELDS = ("block_q", "block_kv", "num_warps", "num_stages", "max_concurrent_steps")
BWD_FIELDS = ("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv", "num_warps_bwd", "num_stages_bwd",
              "mgpu_bwd")

# (spec, why) in the order a budget-limited lease should measure them. dq tiles are (owned query rows,
# streamed kv rows); dk/dv tiles are (streamed query rows, owned kv rows). Footprints are for D=128 bf16.
TUNE_FLASH: tuple[tuple[str, str], ...] = (
    ("cudnn", "the reference every forward goal is stated against"),
    ("pallas:mosaic_gpu@mgpu_bwd=1",
     "FA3-style forward at tokamax's sm90 default (2x64 query rows, 128 kv rows, 2 TMA stages; ~166 KB) and the "
     "Mosaic GPU backward (64/64, 2 stages; ~134 KB): neither measured yet"),
    ("pallas:triton",
     "the defaults (fwd 128x64, 8 warps, 3 stages; bwd 64x64, 8 warps, 2 stages): the H200 baseline "
     "(fwd 0.85x/0.67x cuDNN), backward not measured yet"),
    ("pallas:mosaic_gpu@block_kv=64;max_concurrent_steps=4;mgpu_bwd=1",
     "half-height kv tiles with a 4-deep TMA ring (fwd ~166 KB, bwd ~200 KB): more loads in flight; the "
     "backward's S/dP tiles halve"),
    ("pallas:mosaic_gpu@block_kv=64;max_concurrent_steps=3;mgpu_bwd=1",
     "the same tiles with a 3-deep ring (fwd ~134 KB, bwd ~167 KB)"),
    ("pallas:triton@block_kv=128;num_stages=2;block_q_dq=128;block_kv_dq=32;block_q_dkv=32;block_kv_dkv=128;"
     "num_stages_bwd=3",
     "fwd at jax's Pallas Triton default 128x128 (2 stages of K+V: ~160 KB); bwd with the Triton tutorial's "
     "asymmetric split: each kernel owns 128 rows and streams 32, 3 stages"),
    ("pallas:triton@num_stages=4;block_q_dq=128;block_kv_dq=64;block_q_dkv=64;block_kv_dkv=128",
     "fwd default tiles one stage deeper (~160 KB); bwd owns 128 rows and streams 64"),
    ("pallas:triton@block_q=64;num_warps=4;num_stages=4;num_warps_bwd=4;num_stages_bwd=3",
     "tokamax's Triton heuristic tile (64x64, one warpgroup), 4 stages; bwd 64x64 with 4 warps, 3 stages"),
    ("pallas:mosaic_gpu@block_kv=64;mgpu_bwd=1;block_kv_dq=128",
     "fwd at tokamax's small-memory fallback (64/64, 2 stages; ~102 KB); bwd whose dq kernel streams 128 kv rows "
     "a step (half the steps; ~199 KB; S and dP then need 128 registers a thread and may spill)"),
)
# Left out after lowering them for cuda here: the 3-deep ring at 128 kv rows (tokamax's autotune point) needs
# 235,664 bytes of shared memory and a 6-deep ring at 64 rows 235,784 (limit 232,448).

TUNE_DECODE: tuple[tuple[str, str], ...] = (
    ("xla", "the reference"),
    ("pallas:triton",
     "the device's defaults: DecodeBlockSizes() (128 cache rows a step, splits chosen for ~1024 programs = 4 "
     "here, 4 warps, 2 stages; 54-68% of copy bandwidth on the H200, ~132 KB of shared memory: one program per "
     "SM), on the H200 the 2026-12-04 winner below (kernels/_config.py DEFAULT_DECODE_BLOCKS)"),
    ("pallas:triton@block_kv=64;num_stages=3", "~100 KB: two programs per SM, more bytes in flight per SM"),
    ("pallas:triton@block_kv=64;num_stages=4;num_splits=8",
     "four 64-row stages (the default's bytes in flight, twice the loads queued), 2048 programs (smaller tail)"),
    ("pallas:triton@num_splits=16;num_warps=8", "jax's decode default split count: 4096 programs of 4 blocks"),
    ("pallas:triton@block_kv=32;num_stages=4;num_splits=16", "~68 KB: three programs per SM"),
    ("pallas:triton@block_kv=64;num_stages=3;num_splits=2", "the other direction: 512 long programs"),
)

# CPU proof of the same machinery (interpreted kernels, tiny shapes).
TUNE_FLASH_SMALL: tuple[tuple[str, str], ...] = (
    ("pallas:interpret", "defaults"),
    ("pallas:interpret@block_q=16;block_kv=32;block_q_dq=16;block_kv_dq=32", "smaller query tiles"),
    ("xla", "the reference"),
)
TUNE_DECODE_SMALL: tuple[tuple[str, str], ...] = (
    ("pallas:interpret", "defaults"),
    ("pallas:interpret@block_kv=16;num_splits=2", "small tiles, two splits"),
    ("xla", "the reference"),
)
NAMED_FLASH = {"tune": TUNE_FLASH, "tune-small": TUNE_FLASH_SMALL}
NAMED_DECODE = {"tune": TUNE_DECODE, "tune-small": TUNE_DECODE_SMALL}


def expand(text: str, named: dict[str, tuple[tuple[str, str], ...]]) -> list[str]:
    """A comma list of impl specs, or one of the named sets (``tune``, ``tune-small``)."""
    if text in named:
        return [spec for spec, _ in named[text]]
    return [item.strip() for item in text.split(",") if item.strip()]


LOWERINGS = ("triton", "mosaic_gpu", "mosaic_gpu@mgpu_bwd=1")  # the GPU check's flash backends


def runs_lowering(impl: str, lowerings: set[str]) -> bool:
    """Whether a flash impl spec runs one of ``lowerings`` (names of ``LOWERINGS``): a Mosaic GPU spec with
    ``mgpu_bwd=1`` runs both Mosaic GPU kernels; without it, the Mosaic GPU forward and the Triton backward."""
    if not impl.startswith("pallas:"):
        return False
    backend, _, tiles = impl[len("pallas:"):].partition("@")
    own_bwd = "mgpu_bwd=1" in tiles.split(";")
    if backend == "triton":
        return "triton" in lowerings
    if backend == "mosaic_gpu":
        return "mosaic_gpu" in lowerings or (own_bwd and "mosaic_gpu@mgpu_bwd=1" in lowerings) or (
            not own_bwd and "triton" in lowerings)
    return False


def pallas_spec(impl: str) -> str:
    """The kernel spec part of an impl: ``pallas:triton@x=1`` -> ``triton@x=1``; ``pallas@x=1`` -> ``@x=1``."""
    if impl.startswith("pallas:"):
        return impl[len("pallas:"):]
    return impl[len("pallas"):]


def parse_flash_impl(impl: str):
    """``(backend or None, BlockSizes or None)`` of a ``pallas...`` impl (raises naming a bad field)."""
    from ditto_jax.kernels._config import parse_backend_spec

    return parse_backend_spec(pallas_spec(impl) or None)


def parse_decode_impl(impl: str):
    """``(backend or None, DecodeBlockSizes or None)`` of a ``pallas...`` decode impl."""
    from ditto_jax.kernels._config import parse_decode_spec

    return parse_decode_spec(pallas_spec(impl) or None)


# ------------------------------------------------------------------------------------ shared memory
def flash_smem_bytes(backend: str, blocks, head_dim: int = 128, itemsize: int = 2) -> dict[str, int]:
    """Shared memory per thread block of each flash kernel (``fwd``, ``dq``, ``dkv``), in bytes.

    Mosaic GPU: the kernels' ``SMEM`` allocations (``_flash_mgpu``, ``_flash_mgpu_bwd``) plus
    ``MOSAIC_OVERHEAD_BYTES``; the lowering itself checks the exact figure against 227 KB (also on CPU, through
    ``jax.export`` for cuda), which the tests do for every tuning variant. Triton: an estimate, one buffer per
    pipeline stage for the streamed tiles plus the resident tiles (Triton may keep one stage fewer, so this
    errs high); only compiling on the GPU checks it.
    """
    d, isz = head_dim, itemsize
    out: dict[str, int] = {}
    dq_q, dq_k = blocks.dq
    dkv_q, dkv_k = blocks.dkv
    if backend == "mosaic_gpu":
        bq, bk, st = blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps
        over = MOSAIC_OVERHEAD_BYTES
        out["fwd"] = 2 * bq * d * isz + 2 * st * bk * d * isz + 2 * bq * 4 * 2 + st * bk * 4 + over
        if blocks.mgpu_bwd:
            out["dq"] = 2 * 2 * dq_q * d * isz + 3 * 2 * dq_q * 4 + 2 * st * dq_k * d * isz + st * dq_k * 4 + over
            out["dkv"] = (2 * 2 * dkv_k * d * isz + 2 * dkv_k * 4 + 2 * st * dkv_q * d * isz + 3 * st * dkv_q * 4
                          + over)
            return out
    else:
        stages = blocks.num_stages
        out["fwd"] = stages * 2 * blocks.block_kv * d * isz + blocks.block_q * d * isz
    stages_bwd = blocks.num_stages_bwd or (2 if backend == "mosaic_gpu" else blocks.num_stages)
    out["dq"] = stages_bwd * 2 * dq_k * d * isz + 2 * dq_q * d * isz
    out["dkv"] = stages_bwd * (2 * dkv_q * d * isz + 2 * dkv_q * 4) + 2 * dkv_k * d * isz
    return out


def decode_smem_bytes(blocks, head_dim: int = 128, itemsize: int = 2, group: int = 4) -> int:
    """Shared memory of one decode program (Triton estimate: K and V tiles per stage plus the query rows)."""
    rows = max(16, 1 << (max(group, 1) - 1).bit_length())
    return blocks.num_stages * 2 * blocks.block_kv * head_dim * itemsize + rows * head_dim * itemsize


# ------------------------------------------------------------------------------------ combining tiles
def _concrete(backend: str | None) -> str:
    from ditto_jax.kernels._config import resolve_backend

    return resolve_backend(backend)


def _format(backend: str, blocks) -> str:
    from ditto_jax.kernels._config import default_blocks

    base = default_blocks(backend)
    changed = [f"{f.name}={getattr(blocks, f.name)}" for f in dataclasses.fields(blocks)
               if getattr(blocks, f.name) != getattr(base, f.name)]
    return f"pallas:{backend}" + ("@" + ";".join(changed) if changed else "")


def combine(fwd_impl: str, bwd_impl: str) -> tuple[str | None, str]:
    """One spec with ``fwd_impl``'s forward tiles and ``bwd_impl``'s backward tiles, and a note.

    None when they cannot share a spec: the Mosaic GPU backward runs only behind the Mosaic GPU forward.
    """
    from ditto_jax.kernels._config import default_blocks

    if fwd_impl == bwd_impl:
        return fwd_impl, "one variant is fastest in both passes"
    (fb, fblocks), (bb, bblocks) = parse_flash_impl(fwd_impl), parse_flash_impl(bwd_impl)
    fb, bb = _concrete(fb), _concrete(bb)
    fblocks = fblocks or default_blocks(fb)
    bblocks = bblocks or default_blocks(bb)
    mgpu_bwd = bb in ("mosaic_gpu", "mosaic_gpu_interpret") and bblocks.mgpu_bwd
    if mgpu_bwd and fb != bb:
        return None, (f"the fastest backward is the Mosaic GPU one ({bwd_impl}), which needs the Mosaic GPU "
                      f"forward; the fastest forward is {fwd_impl}")
    # Same lowering, or the Mosaic GPU forward with the Triton backward it runs by default (mgpu_bwd=0).
    if not (fb == bb or (fb, bb) in (("mosaic_gpu", "triton"), ("mosaic_gpu_interpret", "interpret"))):
        return None, f"no combination rule for the {fb} forward with the {bb} backward"
    changes = {k: getattr(bblocks, k) for k in BWD_FIELDS}
    if bb in ("mosaic_gpu", "mosaic_gpu_interpret") and not mgpu_bwd:  # its Triton backward's defaults, explicit
        changes["num_warps_bwd"] = bblocks.num_warps_bwd or 8
        changes["num_stages_bwd"] = bblocks.num_stages_bwd or 2
    combined = fblocks.replace(**changes)
    note = "forward tiles of the fastest forward, backward tiles of the fastest backward"
    if mgpu_bwd and bblocks.max_concurrent_steps != fblocks.max_concurrent_steps:
        note += (f"; the Mosaic GPU backward then runs with the forward's ring depth "
                 f"({fblocks.max_concurrent_steps}, measured with {bblocks.max_concurrent_steps})")
    return _format(fb, combined), note


# ------------------------------------------------------------------------------------ goal summary
def _case_key(row: dict[str, Any], fields: tuple[str, ...]) -> tuple:
    return tuple(row.get(f) for f in fields)


FLASH_KEY = ("batch", "seq", "heads", "kv_heads", "head_dim", "dtype")
DECODE_KEY = ("batch", "cache", "heads", "kv_heads", "head_dim", "dtype")


def _measured_everywhere(rows: list[dict[str, Any]], metric: str, n_cases: int) -> dict[str, float]:
    """impl -> total ``metric`` over the goal cases, for impls measured at every one of them."""
    totals: dict[str, list[float]] = {}
    for r in rows:
        if metric in r and r["impl"].startswith("pallas"):
            totals.setdefault(r["impl"], []).append(r[metric])
    return {impl: sum(v) for impl, v in totals.items() if len(v) == n_cases}


def summarize(flash_rows: list[dict[str, Any]], decode_rows: list[dict[str, Any]], goal_flash: list[dict],
              goal_decode: list[dict], copy_gbs: float | None) -> dict[str, Any]:
    """Best Pallas variant per (pass, causal) at the goal shapes, its ratios, and whether each goal is met.

    ``goal_flash``/``goal_decode`` are the goal cases (dicts of the case fields). A goal with no measured
    variant (or, for the forward, no cuDNN row to compare with) has ``met: None``.
    """
    goals: list[dict[str, Any]] = []
    fkeys = {_case_key(c, FLASH_KEY + ("causal",)) for c in goal_flash}
    frows = [r for r in flash_rows if _case_key(r, FLASH_KEY + ("causal",)) in fkeys and "error" not in r]
    shape = goal_flash[0] if goal_flash else None
    for mode in ("fwd", "bwd"):
        for causal in sorted({c["causal"] for c in goal_flash}, reverse=True):
            rows = [r for r in frows if r["causal"] == causal]
            cands = [r for r in rows if r["impl"].startswith("pallas") and f"{mode}_ms" in r]
            cudnn = next((r for r in rows if r["impl"] == "cudnn" and f"{mode}_ms" in r), None)
            entry: dict[str, Any] = {"goal": f"{'forward' if mode == 'fwd' else 'backward'}, "
                                             f"{'causal' if causal else 'non-causal'}",
                                     "mode": mode, "causal": causal, "variants": len(cands),
                                     "cudnn_tflops": cudnn[f"{mode}_tflops"] if cudnn else None}
            if mode == "fwd":
                entry["target"] = f">= {GOAL_FWD_X_CUDNN:.2f}x cuDNN"
            else:
                entry["target"] = f">= {GOAL_BWD_TFLOPS:.0f} TFLOP/s"
            if cands:
                best = min(cands, key=lambda r: r[f"{mode}_ms"])
                entry.update(impl=best["impl"], tflops=best[f"{mode}_tflops"], ms=best[f"{mode}_ms"])
                entry["x_cudnn"] = cudnn[f"{mode}_ms"] / best[f"{mode}_ms"] if cudnn else None
                if mode == "fwd":
                    entry["met"] = None if cudnn is None else entry["x_cudnn"] >= GOAL_FWD_X_CUDNN
                else:
                    entry["x_goal"] = best["bwd_tflops"] / GOAL_BWD_TFLOPS
                    entry["met"] = best["bwd_tflops"] >= GOAL_BWD_TFLOPS
            else:
                entry.update(impl=None, met=None)
            goals.append(entry)
    dkeys = {_case_key(c, DECODE_KEY) for c in goal_decode}
    drows = [r for r in decode_rows if _case_key(r, DECODE_KEY) in dkeys and "error" not in r and "gbs" in r]
    dcands = [r for r in drows if r["impl"].startswith("pallas")]
    dentry: dict[str, Any] = {"goal": "decode", "mode": "decode", "target": f">= {GOAL_DECODE_PCT_COPY:.0f}% of "
                              "copy bandwidth", "variants": len(dcands), "copy_gbs": copy_gbs}
    if dcands:
        best = max(dcands, key=lambda r: r["gbs"])
        xla = next((r for r in drows if r["impl"] == "xla"), None)
        dentry.update(impl=best["impl"], gbs=best["gbs"], pct_copy_bw=best.get("pct_copy_bw"),
                      x_xla=(xla["ms"] / best["ms"]) if xla else None)
        dentry["met"] = None if best.get("pct_copy_bw") is None else best["pct_copy_bw"] >= GOAL_DECODE_PCT_COPY
    else:
        dentry.update(impl=None, met=None)
    goals.append(dentry)

    summary: dict[str, Any] = {"shape": shape and {k: shape[k] for k in FLASH_KEY},
                               "decode_shape": goal_decode[0] if goal_decode else None, "goals": goals,
                               "met": sum(g["met"] is True for g in goals),
                               "not_met": sum(g["met"] is False for g in goals),
                               "unknown": sum(g["met"] is None for g in goals)}
    summary.update(recommend(frows, len(fkeys)))
    summary["decode_recommended"] = dentry.get("impl")
    return summary


def recommend(goal_rows: list[dict[str, Any]], n_cases: int) -> dict[str, Any]:
    """The fastest measured spec over all goal cases (forward + backward), and the combination of the fastest
    forward tiles with the fastest backward tiles (``combined``; measured or not)."""
    fwd = _measured_everywhere(goal_rows, "fwd_ms", n_cases)
    bwd = _measured_everywhere(goal_rows, "bwd_ms", n_cases)
    out: dict[str, Any] = {"best_fwd": min(fwd, key=fwd.get) if fwd else None,
                           "best_bwd": min(bwd, key=bwd.get) if bwd else None}
    both = {impl: fwd[impl] + bwd[impl] for impl in fwd.keys() & bwd.keys()}
    out["recommended"] = min(both, key=both.get) if both else out["best_fwd"]
    out["combined"], out["combined_note"] = None, None
    if out["best_fwd"] and out["best_bwd"]:
        try:
            out["combined"], out["combined_note"] = combine(out["best_fwd"], out["best_bwd"])
        except ValueError as exc:  # a spec that no longer parses (e.g. another jax): say why, keep the rest
            out["combined_note"] = f"cannot combine: {exc}"
    if out["combined"]:  # name it as measured when an equivalent spec was measured under another spelling
        same = [impl for impl in both if _canonical(impl) == _canonical(out["combined"])]
        out["combined"] = same[0] if same else out["combined"]
    out["combined_measured"] = bool(out["combined"]) and out["combined"] in both
    return out


def _canonical(impl: str):
    """``(concrete backend, BlockSizes)`` of a pallas impl, so equal tilings compare equal however spelled."""
    from ditto_jax.kernels._config import default_blocks

    try:
        backend, blocks = parse_flash_impl(impl)
        backend = _concrete(backend)
        return backend, blocks or default_blocks(backend)
    except ValueError:
        return impl


def _fmt(x: float | None, f: str = "{:.1f}") -> str:
    return "" if x is None else f.format(x)


def goals_markdown(summary: dict[str, Any]) -> str:
    """The goals table (met / not met with numbers) and the recommended specs."""
    shape = summary.get("shape")
    where = (f"[{shape['batch']}, {shape['seq']}, {shape['heads']}/{shape['kv_heads']}, {shape['head_dim']}] "
             f"{shape['dtype']}" if shape else "no flash goal shape measured")
    d = summary.get("decode_shape")
    if d:
        where += f"; decode B={d['batch']}, cache {d['cache']}, Hq/Hkv {d['heads']}/{d['kv_heads']}, D={d['head_dim']}"
    lines = [f"## Goals (best Pallas variant; {where})", "",
             "| goal | target | best variant | measured | reference | status |", "|---|---|---|---|---|---|"]
    for g in summary["goals"]:
        status = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        if g["mode"] == "decode":
            measured = (f"{_fmt(g.get('pct_copy_bw'))}% of copy ({_fmt(g.get('gbs'), '{:.4g}')} GB/s)"
                        if g.get("impl") else "not measured")
            ref = f"copy {_fmt(g.get('copy_gbs'), '{:.4g}')} GB/s" + (
                f"; {g['x_xla']:.2f}x XLA" if g.get("x_xla") else "")
        else:
            if g.get("impl") is None:
                measured = "not measured"
            elif g["mode"] == "fwd":
                measured = (f"{g['x_cudnn']:.2f}x cuDNN ({g['tflops']:.4g} TFLOP/s)" if g.get("x_cudnn")
                            else f"{g['tflops']:.4g} TFLOP/s (no cuDNN row)")
            else:
                measured = f"{g['tflops']:.4g} TFLOP/s ({g['x_goal']:.2g}x goal)"
            ref = f"cuDNN {g['cudnn_tflops']:.4g} TFLOP/s" if g.get("cudnn_tflops") else "no cuDNN row"
        lines.append(f"| {g['goal']} | {g['target']} | {g.get('impl') or ''} | {measured} | {ref} | {status} |")
    lines += ["", f"Goals met: {summary['met']} of {len(summary['goals'])} "
                  f"(not met: {summary['not_met']}, n/a: {summary['unknown']})."]
    if summary.get("recommended"):
        lines.append(f"Fastest measured flash spec over the goal cases (forward + backward time where both were "
                     f"measured): `{summary['recommended']}`.")
    if summary.get("combined") or summary.get("combined_note"):
        state = "measured" if summary.get("combined_measured") else "not measured"
        spec = f"`{summary['combined']}` ({state})" if summary.get("combined") else "none"
        lines.append(f"Best forward + best backward tiles: {spec}; {summary.get('combined_note') or ''}.")
    if summary.get("decode_recommended"):
        lines.append(f"Fastest decode spec: `{summary['decode_recommended']}`.")
    return "\n".join(lines) + "\n"
