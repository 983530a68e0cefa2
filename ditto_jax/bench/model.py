"""``ditto-jax bench model``: forward and train-step tokens/s, MFU against a matmul measured in the same run,
optionally the same weights in transformers (torch) in the same process.

Timings are interleaved round by round (JAX step, torch step, matmul) so that a noisy shared machine slows
all of them alike; each figure is the best round, and the ratios compare best rounds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``bench model`` and ``bench train``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face folder or model checkpoint")
    src.add_argument("--config", help="model config YAML (random init), e.g. configs/model/40m.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers (torch) on the same weights")
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="positions per chunk of the fused head + loss (default: chosen as training chooses it, "
                             "train.loss_chunk: null)")
    parser.add_argument("--override", action="append", default=[], help="model config override, e.g. remat=full")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward-only measurement")


@dataclass
class Timer:
    """A named callable timed once per round; keeps every round's seconds."""

    name: str
    fn: Callable[[], Any]
    times: list[float]

    def run(self) -> None:
        t0 = time.perf_counter()
        self.fn()
        self.times.append(time.perf_counter() - t0)

    @property
    def best(self) -> float:
        return min(self.times)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "devices": jax.device_count(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def load_bench_model(args: argparse.Namespace, mesh: Any) -> tuple[Any, Any]:
    """``(model, cfg)`` from ``--model`` or ``--config`` (+ ``--override``), created on ``mesh``."""
    from ditto_jax.config import apply_overrides, read_yaml, validate
    from ditto_jax.model import ModelConfig, create_model

    if args.model:
        from ditto_jax.checkpoints import load_model

        model, cfg = load_model(args.model, mesh=mesh)
        if args.override:
            cfg = validate(ModelConfig, apply_overrides(cfg.model_dump(), args.override), "--override")
            model.cfg = cfg
        return model, cfg
    cfg = validate(ModelConfig, apply_overrides(read_yaml(args.config), args.override), args.config)
    return create_model(cfg, mesh=mesh, seed=0), cfg


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, every position trained, one segment per row (the contract's batch layout)."""
    r = np.random.RandomState(seed)
    tok = r.randint(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))}


def jax_timers(model: Any, cfg: Any, mesh: Any, batch: dict[str, np.ndarray], *, accum: int,
               loss_chunk: int | None, forward: bool) -> tuple[list[Timer], dict[str, float]]:
    """Timers for the real (compiled-once, donated) train step and, optionally, the logits forward."""
    import jax

    from ditto_jax.distributed import global_batch
    from ditto_jax.train import step as steplib
    from ditto_jax.train.optim import OptimConfig, lr_schedule, make_optimizer

    optim = OptimConfig(peak_lr=1e-5, end_lr=1e-6, weight_decay=0.01)
    tx, schedule = make_optimizer(optim, 1000), lr_schedule(optim, 1000)
    t0 = time.perf_counter()
    graphdef, state = steplib.init_state(model, tx, mesh, seed=0)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    b, s = batch["tokens"].shape
    step = steplib.compile_train_step(graphdef, shardings, tx, schedule, accum=accum, loss_chunk=loss_chunk,
                                      mesh=mesh).lower(state, steplib.abstract_batch(b, s, mesh)).compile()
    compile_s = time.perf_counter() - t0
    chunk = steplib.loss_chunk_for(loss_chunk, b // accum, s, cfg.vocab_size, mesh)
    gb = global_batch(batch, mesh)
    holder = {"state": state}

    def train() -> None:
        holder["state"], metrics = step(holder["state"], gb)
        jax.block_until_ready(metrics)

    timers = [Timer("jax_train", train, [])]
    if forward:
        from ditto_jax.kernels import cpu as cpu_kernels

        cpu_kernel = cpu_kernels.usable_on(mesh.devices.flat)  # as the train step decides
        fwd = jax.jit(lambda p, ids: steplib.merge_model(graphdef, p)(ids, cpu_kernel=cpu_kernel))
        timers.append(Timer("jax_forward", lambda: fwd(holder["state"].params, gb["tokens"]).block_until_ready(), []))
    return timers, {"compile_s": compile_s, "loss_chunk": chunk}


def torch_timers(model: Any, cfg: Any, batch: dict[str, np.ndarray], *, accum: int, forward: bool,
                 source: str | None) -> list[Timer]:
    """Timers for transformers on the same weights: a full AdamW step (loss, backward, step) and the forward."""
    import torch
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = source
        if path is None or not (Path(path) / "config.json").exists():
            from ditto_jax import hf

            hf.save_pretrained(model, cfg, tmp)
            path = tmp
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    hf_model.train()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-5, weight_decay=0.01)
    ids = torch.from_numpy(batch["tokens"]).long()
    labels = torch.from_numpy(batch["targets"]).long()
    micro = ids.shape[0] // accum

    def train() -> None:
        for j in range(accum):
            sl = slice(j * micro, (j + 1) * micro)
            logits = hf_model(input_ids=ids[sl]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     labels[sl].reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    timers = [Timer("torch_train", train, [])]
    if forward:
        def fwd() -> None:
            with torch.no_grad():
                hf_model(input_ids=ids).logits.sum().item()

        timers.append(Timer("torch_forward", fwd, []))
    return timers


def matmul_timer(dtype: str, size: int = 2048) -> Timer:
    """A jitted ``[size, size] @ [size, size]`` matmul (the FLOP/s reference for MFU on CPU)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    return Timer("matmul", lambda: f(a, a).block_until_ready(), [])


def measure(args: argparse.Namespace, accum: int = 1, forward: bool = True) -> dict[str, Any]:
    """The shared measurement of ``bench model`` and ``bench train``."""
    import jax

    from ditto_jax.mesh import MeshConfig, make_mesh
    from ditto_jax.train.metrics import device_peak_flops

    mesh = make_mesh(MeshConfig(data=-1))
    model, cfg = load_bench_model(args, mesh)
    b, s = args.batch, args.seq_len
    if b % accum:
        raise ValueError(f"--batch {b} must be a multiple of --grad-accum {accum}")
    batch = synthetic_batch(b, s, cfg.vocab_size)
    timers, extra = jax_timers(model, cfg, mesh, batch, accum=accum, loss_chunk=args.loss_chunk, forward=forward)
    if args.compare_hf:
        timers += torch_timers(model, cfg, batch, accum=accum, forward=forward, source=args.model)
    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu:
        timers.append(matmul_timer(cfg.dtype))
    for t in timers:  # warm-up round (first calls allocate, torch builds its graph caches)
        t.fn()
    for _ in range(args.rounds):
        for t in timers:
            t.run()
    by = {t.name: t for t in timers}
    tokens = b * s
    train_flops = cfg.flops_per_token(s, training=True) * tokens
    fwd_flops = cfg.flops_per_token(s, training=False) * tokens
    if on_cpu:
        peak = 2.0 * 2048**3 / by["matmul"].best
        peak_source = f"{cfg.dtype} 2048^3 matmul measured in this run"
    else:
        peak, peak_source = device_peak_flops(cfg.dtype)
        peak *= jax.device_count()
    out: dict[str, Any] = {
        "model": args.model or args.config, "num_params": cfg.num_params(), "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype, "remat": cfg.remat, "attention": cfg.attention,
        "batch": b, "seq_len": s, "grad_accum": accum, "rounds": args.rounds,
        "tokens_per_s": tokens / by["jax_train"].best,
        "train_step_s": by["jax_train"].best,
        "train_mfu": train_flops / by["jax_train"].best / peak,
        "flops_per_token_train": cfg.flops_per_token(s, training=True),
        "peak_flops": peak, "peak_source": peak_source, **extra,
    }
    if on_cpu:
        out["matmul_gflops"] = peak / 1e9
    if "jax_forward" in by:
        out["forward_tokens_per_s"] = tokens / by["jax_forward"].best
        out["forward_mfu"] = fwd_flops / by["jax_forward"].best / peak
    if "torch_train" in by:
        out["hf_train_tokens_per_s"] = tokens / by["torch_train"].best
        out["hf_train_mfu"] = train_flops / by["torch_train"].best / peak
        out["train_ratio_vs_hf"] = by["torch_train"].best / by["jax_train"].best
    if "torch_forward" in by:
        out["hf_forward_tokens_per_s"] = tokens / by["torch_forward"].best
        out["forward_ratio_vs_hf"] = by["torch_forward"].best / by["jax_forward"].best
    out["round_times_s"] = {t.name: [round(x, 4) for x in t.times] for t in timers}
    out["machine"] = machine()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``bench model``: forward + train step."""
    result = measure(args, accum=1, forward=not args.no_forward)
    result["command"] = "ditto-jax bench model " + " ".join(_argv(args))
    return result


def table(result: dict[str, Any]) -> str:
    """The ratios against transformers in one line (empty without ``--compare-hf``)."""
    if "train_ratio_vs_hf" not in result:
        return ""
    return (f"train step: {result['train_ratio_vs_hf']:.2f}x transformers; "
            f"forward: {result.get('forward_ratio_vs_hf', float('nan')):.2f}x (loss chunk {result['loss_chunk']})")


def _argv(args: argparse.Namespace) -> list[str]:
    try:
        i = sys.argv.index(args._bench)
        return sys.argv[i + 1:]
    except (ValueError, AttributeError):
        return []
