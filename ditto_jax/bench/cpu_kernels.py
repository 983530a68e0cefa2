"""``ditto-jax bench cpu-kernels``: the CPU decode kernels (``kernels.cpu``) against XLA's ops on one model's
decode shapes, in the model's own code paths (``model.layers.decode_matmul`` over a packed or a plain weight,
``model.attention.cached_attention`` with ``cpu_kernel`` on or off).

- matmul chain: the decode step's weight matmuls for ``B`` rows (per layer q/k/v, o, gate/up, down; then the
  head), every weight read from memory once per pass (the whole model's weights, as in decoding);
- head: the head alone (one wide weight);
- attention: one new token per row against every layer's heads-first float32 cache, rows at
  ``--fill`` of ``--cache-len`` (spread by +-10%);
- prompt attention: ``--prompt-tokens`` new tokens per row after ``--fill`` of the cache, every layer of the
  stacked ``[L, B, S, Hkv, D]`` cache (a prefill after a cached prefix; ``kernels.cpu.chunk_attention``);
- sampler: ``sampling.logits.select_tokens`` on ``[B, vocab]`` logits with the paper's decoding (temperature 0.7,
  top-p 0.8, repetition penalty 1.1 on 5% of the tokens), XLA's against ``kernels.cpu.select_tokens``.

The two implementations alternate round by round in one process (these machines drift); each figure is the
median over rounds, GB/s counts the bytes each read must touch (weights; keys and values up to each row's
position; the logits for the sampler). Every case is also checked: the kernel's output against XLA's
(``max_abs_diff``; for the sampler the log-probabilities of the rows whose tokens agree, and ``agree``, the share
of rows whose sampled tokens agree: float rounding may move a draw across a boundary); a case that disagrees
beyond float32 rounding is an error in the result, not a timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any, Callable

# JAX, numpy and the model are imported in the functions that use them: `ditto-jax bench cpu-kernels --help`
# imports only this module's add_arguments (the CLI's rule for bench modules).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--config", default="model/smollm2-135m", help="model preset whose shapes are used")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16], help="rows (decoding sequences)")
    parser.add_argument("--cache-len", type=int, default=448, help="cache positions per row")
    parser.add_argument("--fill", type=float, default=0.8, help="rows' positions as a fraction of --cache-len")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (the median is reported)")
    parser.add_argument("--iters", type=int, default=10, help="calls per round")
    parser.add_argument("--layers", type=int, default=None, help="use this many layers (default: the model's)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="new tokens per row (prompt attention)")


def _weights(cfg: Any, layers: int, rng: Any) -> list[Any]:
    """The decode step's matrices in call order (float32, std 0.02)."""
    import numpy as np

    d, hd = cfg.hidden_size, cfg.dim_per_head
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    shapes = [(d, qkv), (cfg.num_heads * hd, d), (d, 2 * cfg.intermediate_size), (cfg.intermediate_size, d)]
    out = [rng.standard_normal(s, dtype=np.float32) * 0.02 for _ in range(layers) for s in shapes]
    return out + [rng.standard_normal((d, cfg.vocab_size), dtype=np.float32) * 0.02]


def _rounds(fns: dict[str, Callable[[], Any]], rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternating round by round."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def _timed(case: str, batch: int, nbytes: int, t: dict[str, float], diff: float, **extra: Any) -> dict[str, Any]:
    """One result row: the medians ``t`` of both paths, the bytes a call must touch, the check's difference."""
    return {"case": case, "batch": batch, **extra, "mbytes": round(nbytes / 1e6, 1),
            "xla_ms": round(t["xla"] * 1e3, 3), "kernel_ms": round(t["kernel"] * 1e3, 3),
            "xla_gbs": round(nbytes / t["xla"] / 1e9, 1), "kernel_gbs": round(nbytes / t["kernel"] / 1e9, 1),
            "speedup": round(t["xla"] / t["kernel"], 2), "max_abs_diff": diff}


def _both(make: Callable[[bool], Callable[..., Any]], operands: tuple[Any, ...],
          args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """``make(kernel)`` -> a function of ``operands``: the two outputs' max |difference| and both medians."""
    import jax.numpy as jnp

    xla_fn, kernel_fn = make(False), make(True)
    diff = float(jnp.max(jnp.abs(xla_fn(*operands) - kernel_fn(*operands))))
    t = _rounds({"xla": lambda: xla_fn(*operands), "kernel": lambda: kernel_fn(*operands)}, args.rounds, args.iters)
    return diff, t


def _matmul_case(name: str, weights: list[Any], batch: int, args: argparse.Namespace, rng: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ditto_jax.kernels import cpu as cpu_kernels
    from ditto_jax.model.layers import decode_matmul

    plain = [jnp.asarray(w) for w in weights]
    packed = [cpu_kernels.pack(w) if cpu_kernels.packable(w) else w for w in plain]
    xs = {k: jnp.asarray(rng.standard_normal((batch, k), dtype=np.float32)) for k in {w.shape[0] for w in weights}}

    @jax.jit
    def chain(xs, ws):  # every product kept alive (a column of each), so none is skipped
        return jnp.concatenate([decode_matmul(xs[w.shape[-2]], w)[:, :1] for w in ws], axis=1)

    xla, kernel = chain(xs, plain), chain(xs, packed)
    diff = float(jnp.max(jnp.abs(xla - kernel)))
    scale = float(jnp.max(jnp.abs(xla)))
    t = _rounds({"xla": lambda: chain(xs, plain), "kernel": lambda: chain(xs, packed)}, args.rounds, args.iters)
    nbytes = sum(w.nbytes for w in weights)
    row = _timed(name, batch, nbytes, t, diff, matrices=len(weights))
    if not diff <= 1e-4 * max(scale, 1.0):
        row["error"] = f"kernel and XLA disagree: max |diff| {diff:.3g} (outputs up to {scale:.3g})"
    return row


def _attention_case(cfg: Any, layers: int, batch: int, args: argparse.Namespace, rng: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ditto_jax.model.attention import cached_attention

    hkv, hq, hd, s = cfg.num_kv_heads, cfg.num_heads, cfg.dim_per_head, args.cache_len
    ks = [jnp.asarray(rng.standard_normal((batch, hkv, hd, s), dtype=np.float32)) for _ in range(layers)]
    vs = [jnp.asarray(rng.standard_normal((batch, hkv, s, hd), dtype=np.float32)) for _ in range(layers)]
    q = jnp.asarray(rng.standard_normal((batch, 1, hq, hd), dtype=np.float32))
    centre = args.fill * s
    pos = np.clip(rng.uniform(0.9 * centre, 1.1 * centre, batch).astype(np.int32), 0, s - 1)
    window = cfg.sliding_window

    def step(kernel: bool):
        @jax.jit
        def run(q, ks, vs, pos):
            return jnp.stack([cached_attention(q, k, v, q_offset=pos, impl="xla", heads_first=True,
                                               sliding_window=window, cpu_kernel=kernel) for k, v in zip(ks, vs)])
        return run

    diff, t = _both(step, (q, ks, vs, jnp.asarray(pos)), args)
    read = sum(int(p) + 1 for p in pos) * hkv * hd * 2 * 4 * layers  # keys and values up to each row's position
    row = _timed("attention", batch, read, t, diff, layers=layers, cache_len=s,
                 positions=[int(pos.min()), int(pos.max())])
    if not diff <= 1e-4:
        row["error"] = f"kernel and XLA disagree: max |diff| {diff:.3g}"
    return row


def _prompt_attention_case(cfg: Any, layers: int, batch: int, args: argparse.Namespace,
                           rng: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ditto_jax.kernels import cpu as cpu_kernels
    from ditto_jax.model.attention import cached_attention

    hkv, hq, hd, s, t = cfg.num_kv_heads, cfg.num_heads, cfg.dim_per_head, args.cache_len, args.prompt_tokens
    k = jnp.asarray(rng.standard_normal((layers, batch, s, hkv, hd), dtype=np.float32))
    v = jnp.asarray(rng.standard_normal((layers, batch, s, hkv, hd), dtype=np.float32))
    q = jnp.asarray(rng.standard_normal((batch, t, hq, hd), dtype=np.float32))
    centre = args.fill * s
    off = np.clip(rng.uniform(0.9 * centre, 1.1 * centre, batch).astype(np.int32), 0, max(s - t, 0))

    def step(kernel: bool):
        # Every layer of the stacked cache, as the prompt phases read it. The kernel arm calls what
        # cached_attention runs where decoding uses the kernels, directly: on a host that decodes with XLA's ops
        # cached_attention would run XLA's attention in both arms.
        @jax.jit
        def run(q, k, v, off):
            if kernel:
                return jnp.stack([cpu_kernels.chunk_attention(q, k, v, off, jnp.int32(i)) for i in range(layers)])
            return jnp.stack([cached_attention(q, k, v, q_offset=off, impl="xla", layer=jnp.int32(i))
                              for i in range(layers)])
        return run

    diff, t_run = _both(step, (q, k, v, jnp.asarray(off)), args)
    read = sum(min(int(o) + t, s) for o in off) * hkv * hd * 2 * 4 * layers  # keys and values the queries see
    row = _timed("prompt attention", batch, read, t_run, diff, layers=layers, cache_len=s, new_tokens=t,
                 positions=[int(off.min()), int(off.max())])
    if not diff <= 1e-4:
        row["error"] = f"kernel and XLA disagree: max |diff| {diff:.3g}"
    return row


def _sampler_case(cfg: Any, batch: int, args: argparse.Namespace, rng: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ditto_jax.sampling.logits import select_tokens

    vocab = cfg.vocab_size
    logits = jnp.asarray(rng.standard_normal((batch, vocab), dtype=np.float32) * 3.0)
    presence = jnp.asarray(rng.random((batch, vocab)) < 0.05)
    rows = {"temperature": jnp.full((batch,), 0.7, jnp.float32), "top_k": jnp.zeros((batch,), jnp.int32),
            "top_p": jnp.full((batch,), 0.8, jnp.float32),
            "repetition_penalty": jnp.full((batch,), 1.1, jnp.float32)}
    keys = jax.random.split(jax.random.key(0), batch)

    def step(kernel: bool):
        @jax.jit
        def run(logits):
            return select_tokens(logits, presence=presence, keys=keys, max_top_k=64, kernel=kernel, **rows)
        return run

    xla_fn, kernel_fn = step(False), step(True)
    (x_tok, x_lp), (k_tok, k_lp) = (tuple(map(np.asarray, f(logits))) for f in (xla_fn, kernel_fn))
    same = x_tok == k_tok
    diff = float(np.max(np.abs(x_lp[same] - k_lp[same]))) if same.any() else float("inf")
    t = _rounds({"xla": lambda: xla_fn(logits), "kernel": lambda: kernel_fn(logits)}, args.rounds, args.iters)
    nbytes = batch * vocab * 4
    row = _timed("sampler", batch, nbytes, t, diff, vocab=vocab)
    row["agree"] = round(float(same.mean()), 3)
    if not (diff <= 1e-4 and same.mean() >= 0.9):
        row["error"] = (f"kernel and XLA sampler disagree: tokens agree in {same.mean():.0%} of rows, log-probability "
                        f"max |diff| {diff:.3g}")
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case for every ``--batch``; returns the result dict (``rows``, one per case and batch)."""
    import jax
    import numpy as np

    from ditto_jax.kernels import cpu as cpu_kernels
    from ditto_jax.model import load_model_config

    if jax.default_backend() != "cpu":
        raise SystemExit(f"error: bench cpu-kernels measures the CPU kernels; the backend is {jax.default_backend()}")
    if not cpu_kernels.available():
        raise SystemExit(f"error: the CPU kernels cannot run here: {cpu_kernels.reason()}")
    cfg = load_model_config(args.config)
    layers = args.layers or cfg.num_layers
    rng = np.random.default_rng(0)
    weights = _weights(cfg, layers, rng)
    # What decoding runs here by default; the kernel arm of every case runs the kernels whatever it is.
    why = cpu_kernels.decode_reason()
    rows = []
    for batch in args.batch:
        rows.append(_matmul_case("matmul chain", weights, batch, args, rng))
        rows.append(_matmul_case("head", weights[-1:], batch, args, rng))
        rows.append(_attention_case(cfg, layers, batch, args, rng))
        rows.append(_prompt_attention_case(cfg, layers, batch, args, rng))
        rows.append(_sampler_case(cfg, batch, args, rng))
    return {"bench": "cpu-kernels", "config": args.config, "layers": layers, "cpu": _cpu_name(),
            "cores": len(os.sched_getaffinity(0)), "kernel_threads": os.environ.get("DITTO_CPU_KERNEL_THREADS"),
            "decoding_by_default": "cpu kernels" if why is None else f"xla ({why})",
            "rounds": args.rounds, "iters": args.iters, "rows": rows, "errors": sum("error" in r for r in rows)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(result: dict[str, Any]) -> str:
    """Markdown: one line per case and batch."""
    lines = [f"CPU kernels against XLA ({result['config']}, {result['layers']} layers, {result['cores']} "
             f"cores, {result['rounds']} alternating rounds, medians; decoding here by default: "
             f"{result['decoding_by_default']})", "",
             "| case | B | MB read | XLA ms | kernel ms | XLA GB/s | kernel GB/s | speed-up | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['batch']} | {r['mbytes']} | {r['xla_ms']} | {r['kernel_ms']} | "
                     f"{r['xla_gbs']} | {r['kernel_gbs']} | **{r['speedup']}x** | {r['max_abs_diff']:.2g} |")
        if "error" in r:
            lines.append(f"| ERROR: {r['error']} |")
    return "\n".join(lines)
