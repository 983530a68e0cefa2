"""``ditto-jax bench sample``: generated tokens/s of the sampling engine, % of roofline, optionally against
transformers ``generate`` on the same weights and settings in the same process.

Roofline per decode step = max(bytes read / measured bandwidth, FLOPs / measured matmul rate), with bytes =
matmul weights + the KV cache read at the run's mean length, FLOPs = ``cfg.flops_per_token`` (attention
included) x batch; bandwidth and matmul rate are measured in this run (``roofline_probes``: on CPU a 128 MiB
float32 sum and a 1024^3 float32 matmul, the better of XLA and torch; on GPU/TPU a 2 GiB read and a 2 GiB copy
and an 8192^3 matmul in the model's compute dtype; the JSON names the probes used). Timings alternate
ours/theirs and report medians; every run (the warm-up too) gets fresh prompts, the same for both sides, and the
JSON says whether a timed run compiled or reused a cached prompt prefix (``warning`` when one did). The
``*_per_cpu_s`` figures divide by process CPU time, which a machine shared with other jobs disturbs less than wall
time (``load_avg_1m`` says how shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``bench sample``."""
    from ditto_jax.commands.sample import add_sampling_arguments

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face or model checkpoint folder")
    src.add_argument("--config", default=None, help="random-init model preset (default model/40m)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32, help="decode steps per device call")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median reported)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers generate on the same weights")
    add_sampling_arguments(p)


@dataclasses.dataclass(frozen=True)
class RooflineProbes:
    """What the roofline is measured with: a memory-bound and a compute-bound XLA program."""

    read_elements: int  # a sum over this many elements (read bandwidth)
    copy_elements: int  # x + 1 over this many elements, counted as read + write (0: no copy probe)
    matmul_n: int  # an n^3 matmul (FLOP rate)
    dtype: str
    bandwidth_repeats: int  # best of this many timed runs
    matmul_repeats: int
    with_torch: bool  # also time torch's matmul and keep the faster (CPU)

    def describe(self) -> dict[str, str]:
        """Human-readable names of the probes for the JSON report."""
        size = lambda n: f"{n * np.dtype(self.dtype).itemsize / 2**20:.0f} MiB"  # noqa: E731
        bw = f"read: {size(self.read_elements)} {self.dtype} sum"
        if self.copy_elements:
            bw += f"; copy: {size(self.copy_elements)} {self.dtype} x+1 (read + write); the faster of the two"
        return {"bandwidth_probe": f"{bw}; best of {self.bandwidth_repeats}",
                "matmul_probe": f"{self.matmul_n}^3 {self.dtype} matmul, best of {self.matmul_repeats}"
                                + (" (the faster of XLA and torch)" if self.with_torch else "")}


def roofline_probes(platform: str, dtype: str) -> RooflineProbes:
    """CPU: a 128 MiB float32 sum and a 1024^3 float32 matmul (the CPU goals were stated against these).
    GPU/TPU: sizes that saturate an accelerator, in the model's compute dtype: a 2 GiB read and a 2 GiB copy,
    an 8192^3 matmul (1.1 TFLOP, about a millisecond on an H100)."""
    if platform in ("gpu", "tpu"):
        n = (2 << 30) // np.dtype(dtype).itemsize
        return RooflineProbes(read_elements=n, copy_elements=n, matmul_n=8192, dtype=dtype,
                              bandwidth_repeats=10, matmul_repeats=10, with_torch=False)
    return RooflineProbes(read_elements=32 * 1024 * 1024, copy_elements=0, matmul_n=1024, dtype="float32",
                          bandwidth_repeats=4, matmul_repeats=5, with_torch=True)


def _measure_bandwidth(probes: RooflineProbes) -> tuple[float, str]:
    """Bytes/s of the faster of the read (and, on accelerators, copy) probe, and which one it was."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((probes.read_elements,), probes.dtype)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = x.nbytes / min(_timed(lambda x=x: f(x).block_until_ready()) for _ in range(probes.bandwidth_repeats))
    which = "read"
    del x
    if probes.copy_elements:
        y = jnp.ones((probes.copy_elements,), probes.dtype)
        g = jax.jit(lambda a: a + 1)
        g(y).block_until_ready()
        copy = 2 * y.nbytes / min(_timed(lambda: g(y).block_until_ready()) for _ in range(probes.bandwidth_repeats))
        if copy > best:
            best, which = copy, "copy"
        del y
    return best, which


def _measure_matmul_rate(probes: RooflineProbes) -> float:
    """FLOP/s of the matmul probe in XLA (and torch when ``with_torch``, taking the better)."""
    import jax
    import jax.numpy as jnp

    n = probes.matmul_n
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(probes.dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(probes.matmul_repeats))
    if probes.with_torch:
        try:
            import torch

            t = torch.randn(n, n)
            t @ t
            best = min(best, min(_timed(lambda: t @ t) for _ in range(probes.matmul_repeats)))
        except ImportError:
            pass
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _roofline(cfg: Any, batch: int, prompt_len: int, new_tokens: int, bandwidth: float, rate: float) -> dict[str, float]:
    mean_len = prompt_len + (new_tokens + 1) / 2
    itemsize = np.dtype(cfg.param_dtype).itemsize
    weights = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.dim_per_head * mean_len * batch * np.dtype(cfg.dtype).itemsize
    step_bytes = weights * itemsize + kv
    step_flops = batch * cfg.flops_per_token(int(mean_len), training=False)
    step_s = max(step_bytes / bandwidth, step_flops / rate)
    return {"step_bytes": float(step_bytes), "step_flops": float(step_flops), "roofline_step_ms": step_s * 1e3,
            "roofline_tokens_per_s": batch / step_s, "bound": "memory" if step_bytes / bandwidth > step_flops / rate else "compute"}


def table(result: dict[str, Any]) -> str:
    """The result as markdown: throughput of both sides, the step time and roofline, the timed runs' own check."""
    hf = "hf_tokens_per_s" in result
    lines = ["| | ours | transformers `generate` | ratio |", "|---|---:|---:|---:|",
             f"| generated tokens/s (median of {len(result['runs_s'])} runs) | {result['tokens_per_s']:.1f} | "
             + (f"{result['hf_tokens_per_s']:.1f} | **{result['speedup_vs_hf']:.2f}x** |" if hf else "| |"),
             f"| tokens per CPU-second | {result['tokens_per_cpu_s']:.1f} | "
             + (f"{result['hf_tokens_per_cpu_s']:.1f} | {result['speedup_vs_hf_cpu_time']:.2f}x |" if hf else "| |"),
             "| runs (s) | " + ", ".join(f"{x:.2f}" for x in result["runs_s"]) + " | "
             + (", ".join(f"{x:.2f}" for x in result["hf_runs_s"]) if hf else "") + " | |",
             f"| step (ms), % of roofline ({result['roofline_bound']}-bound) | {result['step_ms']:.2f}, "
             f"{result['pct_of_roofline']:.1f}% | | |",
             "| timed runs: compilation s, prefix-cache tokens saved | "
             + ", ".join(f"{x:.2f}" for x in result["timed_runs_compile_s"]) + "; "
             + ", ".join(str(x) for x in result["timed_runs_prefix_tokens_saved"]) + " | | |"]
    if result.get("warning"):
        lines += ["", f"WARNING: {result['warning']}."]
    return "\n".join(lines)


def _hf_model(args: argparse.Namespace, model: Any, cfg: Any):
    import tempfile

    import torch
    import transformers

    from ditto_jax import hf

    path = args.model
    if path is None or not os.path.exists(os.path.join(path, "config.json")):
        path = tempfile.mkdtemp(prefix="bench-sample-hf-")
        hf.save_pretrained(model, cfg, path)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_generate(hf_model: Any, prompts: np.ndarray, params: Any, new_tokens: int) -> int:
    import torch

    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:
        kwargs.update(do_sample=False)
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    with torch.no_grad():
        out = hf_model.generate(torch.as_tensor(prompts, dtype=torch.long),
                                attention_mask=torch.ones(prompts.shape, dtype=torch.long), **kwargs)
    return int((out.shape[1] - prompts.shape[1]) * out.shape[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark the engine (and transformers with ``--compare-hf``); returns the JSON result."""
    import jax

    from ditto_jax.checkpoints import ModelSource
    from ditto_jax.commands.sample import sampling_params_from_args
    from ditto_jax.sampling import EngineConfig, Request, load_engine

    params = sampling_params_from_args(args).model_copy(update={"ignore_eos": True,
                                                                "max_new_tokens": args.new_tokens})
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    source = ModelSource(path=args.model) if args.model else ModelSource(config=args.config or "model/40m")
    # one device, one prompt bucket; no persistent compilation cache: the first run's time includes compiling
    engine_cfg = EngineConfig(batch_size=b, chunk=args.chunk, min_bucket=p, max_top_k=max(64, args.top_k),
                              mesh=None, compile_cache="off")
    loaded = load_engine(source, engine_cfg, max_len=lambda *_: p + n)
    described, model, cfg, engine = source.describe(), loaded.model, loaded.model_cfg, loaded.engine
    rng = np.random.RandomState(0)
    # Fresh prompts for every run (the same for both sides): a repeated prompt would hit the engine's prefix cache,
    # skipping its prefill and compiling that path inside the first timed run.
    prompt_sets = [rng.randint(3, min(cfg.vocab_size, 30000), (b, p)).astype(np.int32) for _ in range(args.repeats + 1)]

    def prefix_saved() -> int:
        return engine.prefix.stats.tokens_saved if engine.prefix is not None else 0

    def ours(tag: str, prompts: np.ndarray) -> tuple[float, float, int, float, int]:
        """``(wall s, CPU s, tokens, s spent compiling, prompt tokens taken from the prefix cache)``."""
        reqs = [Request(f"{tag}-{i}", prompts[i].tolist(), params) for i in range(b)]
        k0, h0 = engine.timing.compile_s, prefix_saved()
        c0, t0 = time.process_time(), time.perf_counter()
        tokens = sum(len(r.output_ids) for r in engine.generate(reqs))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, tokens, engine.timing.compile_s - k0, prefix_saved() - h0

    compile_s = ours("warmup", prompt_sets[0])[0]
    hf_model = _hf_model(args, model, cfg) if args.compare_hf else None
    if hf_model is not None:
        _hf_generate(hf_model, prompt_sets[0][:, :8], params, 4)  # warm-up
    runs, hf_runs = [], []
    for r, prompts in enumerate(prompt_sets[1:]):
        runs.append(ours(f"r{r}", prompts))
        if hf_model is not None:
            c0, t0 = time.process_time(), time.perf_counter()
            tokens = _hf_generate(hf_model, prompts, params, n)
            hf_runs.append((time.perf_counter() - t0, time.process_time() - c0, tokens))
    probes = roofline_probes(jax.default_backend(), np.dtype(cfg.dtype).name)
    bandwidth, bandwidth_kind = _measure_bandwidth(probes)
    rate = _measure_matmul_rate(probes)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    roof = _roofline(cfg, b, p, n, bandwidth, rate)
    wall = statistics.median(x[0] for x in runs)
    cpu = statistics.median(x[1] for x in runs)
    tokens = runs[0][2]
    result: dict[str, Any] = {
        "bench": "sample", "model": described,
        "device": jax.devices()[0].device_kind, "batch": b, "prompt_len": p, "new_tokens": n,
        "decode_matmul": loaded.stats()["decode_matmul"],
        "sampling": params.model_dump(include={"temperature", "top_p", "top_k", "repetition_penalty"}),
        "tokens_per_s": round(tokens / wall, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
        "step_ms": round(wall / n * 1e3, 2), "first_run_s_with_compile": round(compile_s, 2),
        "bandwidth_gb_s": round(bandwidth / 1e9, 2), "matmul_gflop_s": round(rate / 1e9, 1),
        **probes.describe(), "bandwidth_probe_used": bandwidth_kind,
        "roofline_tokens_per_s": round(roof["roofline_tokens_per_s"], 1), "roofline_bound": roof["bound"],
        "pct_of_roofline": round(100 * tokens / wall / roof["roofline_tokens_per_s"], 1),
        "runs_s": [round(x[0], 3) for x in runs],
        # With the cores to itself and every thread busy, wall time would be CPU time / cores: an estimate
        # for shared machines, where wall time mostly measures the other jobs.
        "pct_of_roofline_cpu_time": round(100 * tokens / cpu * cores / roof["roofline_tokens_per_s"], 1),
        "cores": cores, "load_avg_1m": round(os.getloadavg()[0], 2),
        # The instrument's own check: the timed runs must neither compile nor reuse cached prompt prefixes.
        "timed_runs_compile_s": [round(x[3], 3) for x in runs],
        "timed_runs_prefix_tokens_saved": [x[4] for x in runs],
    }
    if any(x[3] > 0.01 for x in runs) or any(x[4] for x in runs):
        result["warning"] = ("timed runs compiled or hit the prefix cache: tokens/s understates (compilation) or "
                             "overstates (skipped prefill) the engine")
    if hf_runs:
        hf_wall = statistics.median(x[0] for x in hf_runs)
        hf_cpu = statistics.median(x[1] for x in hf_runs)
        hf_tokens = hf_runs[0][2]
        result.update({
            "hf_tokens_per_s": round(hf_tokens / hf_wall, 1), "hf_tokens_per_cpu_s": round(hf_tokens / hf_cpu, 1),
            "speedup_vs_hf": round((tokens / wall) / (hf_tokens / hf_wall), 2),
            "speedup_vs_hf_cpu_time": round((tokens / cpu) / (hf_tokens / hf_cpu), 2),
            "hf_runs_s": [round(x[0], 3) for x in hf_runs],
        })
    return result
