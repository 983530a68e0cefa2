"""``ditto-jax train``: the SFT loop (resume, steps, validation, checkpoints, NaN guard, SIGTERM, HF export).

``WORKDIR`` gets ``config.yaml``, ``metrics.jsonl`` (one line a step), ``tensorboard/``, ``checkpoints/<step>``,
``tokenizer/``, ``data_summary.json``, ``train_summary.json`` (a ``TrainResult``) and, with ``export_hf``,
``export/hf``. A run ends ``completed`` (also at once, compiling nothing, when the newest complete checkpoint is
already at ``train.steps``), ``preempted`` (SIGTERM: the step in flight is finished and checkpointed; see
``preemption.py``) or with a ``TrainingError`` (bad input, non-finite loss).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from ditto_jax import hf
from ditto_jax.checkpoints import (
    EXPORT_DIR,
    TOKENIZER_DIR,
    load_model,
    load_model_source,
    source_tokenizer,
    write_tokenizer_dir,
)
from ditto_jax.config import dump_config
from ditto_jax.data.pipeline import make_pipeline, prepare_examples, reason_counts
from ditto_jax.distributed import global_batch, is_primary
from ditto_jax.fileio import atomic_write_json, atomic_write_text
from ditto_jax.mesh import make_mesh
from ditto_jax.model import ModelConfig, Transformer
from ditto_jax.train import step as steplib
from ditto_jax.train.checkpoint import Checkpoints, latest_step_dir, read_meta
from ditto_jax.train.config import SFTConfig, resolve_asset_paths
from ditto_jax.train.metrics import MetricsWriter, device_peak_flops
from ditto_jax.train.optim import lr_schedule, make_optimizer
from ditto_jax.train.preemption import PreemptionGuard


class TrainingError(RuntimeError):
    """Training cannot go on (bad input, non-finite loss); the message says why and what was kept."""


@dataclasses.dataclass
class TrainResult:
    """How a ``run_training`` call ended."""

    status: str  # "completed" | "preempted" | "non_finite"
    step: int
    last_checkpoint: int | None
    metrics: dict[str, Any]


def _tokenizer(cfg: SFTConfig) -> Any:
    return source_tokenizer(cfg.model, required=True)


def _pipeline(cfg: SFTConfig, tokenizer: Any, validation_split: bool = False) -> Any:
    data = cfg.data.model_copy(update={"paths": resolve_asset_paths(cfg.data.paths)})
    if validation_split:
        paths = resolve_asset_paths(cfg.validation.paths) if cfg.validation.paths is not None else data.paths
        data = data.model_copy(update={"paths": paths, "split": cfg.validation.split, "shuffle": False})
    try:
        pipe = make_pipeline(data, tokenizer)
    except FileNotFoundError as exc:
        raise TrainingError(f"{'validation' if validation_split else 'data'}.paths: corpus not found: {exc}") from exc
    except ValueError as exc:
        raise TrainingError(f"{'validation' if validation_split else 'data'}: {exc} (paths: {data.paths}; "
                            f"{_skip_reasons(data, tokenizer)})") from exc
    return pipe


def _skip_reasons(data: Any, tokenizer: Any) -> str:
    try:
        _, summary = prepare_examples(data, tokenizer, jax.process_index(), jax.process_count())
    except Exception as exc:  # noqa: BLE001 - only used to enrich an error message
        return f"summary unavailable: {exc}"
    return f"sessions read: {summary.read.read}, skipped/dropped: {reason_counts(summary) or 'none'}"


def _check_mesh(cfg: SFTConfig, mesh: jax.sharding.Mesh) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.data.global_batch_size // cfg.train.grad_accum
    if micro % dp:
        raise TrainingError(f"micro-batch {micro} (data.global_batch_size / train.grad_accum) is not divisible "
                            f"by the {dp} data-parallel devices (mesh data x fsdp)")
    if cfg.data.global_batch_size % jax.process_count():
        raise TrainingError(f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by the "
                            f"{jax.process_count()} processes")


def _model_config(cfg: SFTConfig, meta: dict[str, Any] | None) -> ModelConfig | None:
    return ModelConfig.model_validate(meta["model_config"]) if meta and "model_config" in meta else None


def run_training(cfg: SFTConfig, workdir: str | Path) -> TrainResult:
    """Train (or resume training) in ``workdir``; see the module docstring for what is written there and how
    a run ends."""

    workdir = Path(workdir)
    finished = _already_finished(cfg, workdir)
    if finished is not None:
        return finished
    workdir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        atomic_write_text(workdir / "config.yaml", dump_config(cfg))

    tokenizer = _tokenizer(cfg)
    pipe = _pipeline(cfg, tokenizer)
    eval_pipe = _pipeline(cfg, tokenizer, validation_split=True) if cfg.validation.every else None
    mesh = make_mesh(cfg.mesh)
    _check_mesh(cfg, mesh)
    rules = cfg.mesh.logical_rules()

    ckpts = Checkpoints(workdir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    total = cfg.train.steps
    tx = make_optimizer(cfg.optim, total)
    schedule = lr_schedule(cfg.optim, total)
    data_it = pipe.iterator()

    restored = None
    if ckpts.steps():
        model_cfg = None
        for step_no in reversed(ckpts.steps()):  # the model config of the newest readable metadata
            try:
                model_cfg = _model_config(cfg, read_meta(ckpts.directory / str(step_no)))
                break
            except (OSError, ValueError):
                continue
        if model_cfg is None:
            raise TrainingError(f"{ckpts.directory}: no checkpoint has readable metadata (meta/metadata); "
                                "move the checkpoints away to start afresh")
        abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
        target = steplib.abstract_state(abstract_model, tx, mesh, rules)
        restored = ckpts.restore_latest(target.params, _train_part(target))
    if restored is not None:
        model_cfg = _model_config(cfg, restored.meta)
        graphdef, _ = nnx.split(abstract_model, nnx.Param)
        state = steplib.TrainState(params=restored.params, **restored.train)
        data_it.set_state(restored.data)
        _say(f"resumed from {ckpts.directory / str(restored.step)} (step {restored.step})")
    else:
        model, model_cfg, _ = load_model_source(cfg.model, mesh=mesh)
        _say(f"model: {cfg.model.describe()}, {model_cfg.num_params() / 1e6:.1f}M parameters")
        graphdef, state = steplib.init_state(model, tx, mesh, cfg.train.seed, rules)
        del model
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                            f"{model_cfg.vocab_size}: token ids would fall outside the embedding")
    shardings = jax.tree.map(lambda x: x.sharding, state)
    start = int(jax.device_get(state.step))

    seq, batch = cfg.data.seq_len, cfg.data.global_batch_size
    t0 = time.perf_counter()
    train_fn = steplib.compile_train_step(graphdef, shardings, tx, schedule, accum=cfg.train.grad_accum,
                                          loss_chunk=cfg.train.loss_chunk, mesh=mesh)
    train_step = train_fn.lower(state, steplib.abstract_batch(batch, seq, mesh)).compile()
    eval_step = None
    if eval_pipe is not None:
        eval_step = steplib.compile_eval_step(graphdef, shardings, loss_chunk=cfg.train.loss_chunk, mesh=mesh)
    chunk = steplib.loss_chunk_for(cfg.train.loss_chunk, batch // cfg.train.grad_accum, seq, model_cfg.vocab_size, mesh)
    _say(f"compiled the train step in {time.perf_counter() - t0:.1f}s (loss chunk: {chunk} positions"
         f"{'' if cfg.train.loss_chunk else ', chosen for this run'})")

    peak, peak_source = device_peak_flops(model_cfg.dtype)
    flops_per_token = model_cfg.flops_per_token(seq)
    meta = {"sft_config": cfg.model_dump(mode="json"), "model_config": model_cfg.model_dump(mode="json"),
            "process_count": jax.process_count()}
    writer = MetricsWriter(workdir, tensorboard=cfg.log.tensorboard, resume_step=start)
    if is_primary():
        atomic_write_json(workdir / "data_summary.json", pipe.summary.to_dict())
        if not (workdir / TOKENIZER_DIR).exists():  # lets load_model(WORKDIR) find the tokenizer
            write_tokenizer_dir(tokenizer, workdir / TOKENIZER_DIR)

    def save(step: int, st: steplib.TrainState) -> None:
        ckpts.save(step, st.params, _train_part(st), data_it.get_state(), dict(meta, step=step))

    last_saved = restored.step if restored is not None else None
    status, record = "completed", {}
    progress = _progress(cfg, start, total)
    with PreemptionGuard() as guard:
        if guard.warning:
            _say(guard.warning)
        try:
            step = start
            stop = guard.should_stop(step)
            last = time.perf_counter()
            while step < total and not stop:
                local = next(data_it)
                state, metrics = train_step(state, global_batch(local, mesh))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                step += 1
                dt, last = now - last, now
                if not metrics.pop("finite"):
                    status = "non_finite"
                    record = dict(metrics, step=step)
                    break
                tps = batch * seq / dt
                record = {"step": step, **{k: metrics[k] for k in ("loss", "accuracy", "lr", "grad_norm")},
                          "trained_tokens": int(metrics["tokens"]), "tokens_per_s": tps, "step_time_s": dt,
                          "mfu": flops_per_token * tps / (peak * jax.device_count())}
                if eval_step is not None and (step % cfg.validation.every == 0 or step == total):
                    record.update(_evaluate(eval_step, state.params, eval_pipe, cfg, mesh))
                    last = time.perf_counter()
                writer.write(record)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:.0f}")
                stop = guard.should_stop(step)
                if stop and step < total:
                    _say(f"SIGTERM: stopping after step {step}; saving its checkpoint")
                if step % cfg.checkpoint.every == 0 or step == total or stop:
                    save(step, state)
                    last_saved = step
                    last = time.perf_counter()
        finally:
            progress.close()
            ckpts.close()  # waits for the last (asynchronous) save: a SIGTERM meanwhile is only recorded
            writer.close()
        if stop and step < total and status == "completed":
            status = "preempted"

        if status == "non_finite":
            where = (f"the last good checkpoint is {ckpts.directory / str(last_saved)} (step {last_saved})"
                     if last_saved is not None else "no checkpoint was written")
            raise TrainingError(f"non-finite loss or gradient at step {record['step']} (loss={record.get('loss')}, "
                                f"grad_norm={record.get('grad_norm')}); training stopped, {where}. Lower "
                                f"optim.peak_lr, check the data, or raise optim.clip_norm.")
        if status == "preempted":
            saved = f"checkpoint saved at step {last_saved}" if last_saved is not None else "no checkpoint yet"
            _say(f"SIGTERM: {saved}; re-run the same command to resume")
        elif cfg.export_hf:
            _export(steplib.merge_model(graphdef, state.params), model_cfg, tokenizer, workdir)
        return _finish(workdir, TrainResult(status=status, step=int(jax.device_get(state.step)),
                                            last_checkpoint=last_saved, metrics=record))


def _finish(workdir: Path, result: TrainResult) -> TrainResult:
    if is_primary():
        atomic_write_json(workdir / "train_summary.json", dataclasses.asdict(result))
    return result


def _already_finished(cfg: SFTConfig, workdir: Path) -> TrainResult | None:
    """The result of a run whose newest complete checkpoint is at ``train.steps`` (or later), without building
    the model or compiling anything (``None`` if there is training left to do). A requested Hugging Face
    export that is missing is written from that checkpoint."""
    try:
        step_dir = latest_step_dir(workdir)
        read_meta(step_dir)
    except (OSError, ValueError):  # no checkpoint, or unreadable metadata: the normal path reports and falls back
        return None
    step = int(step_dir.name)
    if step < cfg.train.steps:
        return None
    _say(f"already complete at step {step} (train.steps={cfg.train.steps}, {step_dir}); nothing to do")
    if cfg.export_hf and not (workdir / EXPORT_DIR / "config.json").exists():
        model, model_cfg = load_model(step_dir, mesh=make_mesh(cfg.mesh), rules=cfg.mesh.logical_rules())
        _say(f"export_hf: {workdir / EXPORT_DIR} is missing; exporting step {step}")
        _export(model, model_cfg, _tokenizer(cfg), workdir)
    return _finish(workdir, TrainResult(status="completed", step=step, last_checkpoint=step,
                                        metrics=_final_metrics(workdir, step)))


def _final_metrics(workdir: Path, step: int) -> dict[str, Any]:
    """The metrics of ``step`` as a normal finish reports them (train_summary.json, else metrics.jsonl)."""
    try:
        summary = json.loads((workdir / "train_summary.json").read_text())
        if summary.get("status") == "completed" and summary.get("step") == step:
            return dict(summary.get("metrics") or {})
    except (OSError, ValueError):
        pass
    found: dict[str, Any] = {}
    try:
        lines = (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step") == step:
            found = rec
    return found


def _train_part(state: steplib.TrainState) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _evaluate(eval_step: Any, params: Any, pipe: Any, cfg: SFTConfig, mesh: Any) -> dict[str, float]:
    it = pipe.iterator()
    loss = correct = tokens = 0.0
    for _ in range(cfg.validation.batches):
        out = jax.device_get(eval_step(params, global_batch(next(it), mesh)))
        loss, correct, tokens = loss + float(out["loss_sum"]), correct + float(out["correct"]), tokens + float(out["tokens"])
    if tokens == 0:
        return {"eval_loss": math.nan, "eval_accuracy": math.nan}
    return {"eval_loss": loss / tokens, "eval_accuracy": correct / tokens}


def _export(model: Transformer, model_cfg: ModelConfig, tokenizer: Any, workdir: Path) -> None:
    out = workdir / EXPORT_DIR
    hf.save_pretrained(model, model_cfg, out, tokenizer=tokenizer)
    _say(f"exported the Hugging Face model to {out}")


def _progress(cfg: SFTConfig, start: int, total: int) -> Any:
    return tqdm(total=total, initial=start, desc="train", unit="step",
                disable=not (cfg.log.progress and is_primary()), dynamic_ncols=True)


def _say(message: str) -> None:
    if is_primary():
        print(message, flush=True)
