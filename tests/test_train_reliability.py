"""Trainer reliability through the real CLI: kill -9 and SIGTERM then resume exactly, corrupt checkpoint
fallback, a finished run not redone, invalid configs and corpora rejected before compilation."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import FAST, REPO, env, load_params, metrics, run_train, train_cmd, write_corpus

from ditto_jax.config import ConfigError, validate
from ditto_jax.train.config import SFTConfig, load_sft_config

STEPS = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "sessions.jsonl")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    proc = run_train(workdir, corpus, *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_uninterrupted_run_writes_metrics_and_checkpoints(reference_run: Path) -> None:
    lines = metrics(reference_run)
    assert [m["step"] for m in lines] == list(range(1, 7))
    for m in lines:
        assert {"loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"} <= set(m)
        assert np.isfinite(m["loss"]) and m["mfu"] > 0
    assert lines[-1]["loss"] < lines[0]["loss"]
    steps = sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]


def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path: Path, corpus: Path, reference_run: Path) -> None:
    proc = subprocess.Popen(train_cmd(tmp_path, corpus, *STEPS), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists() and \
                any(m["step"] >= 3 for m in metrics(tmp_path)):
            break  # a finished checkpoint exists and training went past it
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in metrics(tmp_path))
    assert killed_at < 6
    resumed = run_train(tmp_path, corpus, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 7))
    _assert_same_final_params(reference_run, tmp_path)


def _assert_same_final_params(reference: Path, workdir: Path) -> None:
    a, b = load_params(reference / "checkpoints" / "6"), load_params(workdir / "checkpoints" / "6")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [m["loss"] for m in metrics(workdir)] == [m["loss"] for m in metrics(reference)]


def test_sigterm_checkpoints_the_step_in_flight_and_resumes_exactly(tmp_path: Path, corpus: Path,
                                                                     reference_run: Path) -> None:
    from ditto_jax.train.preemption import PREEMPTED_EXIT_CODE

    # No periodic checkpoint before the end: any earlier one can only come from SIGTERM.
    steps = ["train.steps=6", "checkpoint.every=100", "checkpoint.keep=5"]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        # Its own process group: SIGTERM goes to the whole group, as SLURM and systemd send it.
        proc = subprocess.Popen(train_cmd(tmp_path / "run", corpus, *steps), env=env(), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    work = tmp_path / "run"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not any(m["step"] >= 2 for m in metrics(work)):
            time.sleep(0.01)
        # Frozen, it cannot race past the last step before the signal lands, however loaded the machine is.
        os.killpg(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, f"finished before SIGTERM: {log.read_text()[-2000:]}"
        seen = max(m["step"] for m in metrics(work))
        assert seen < 5
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGCONT)
        t0 = time.time()
        while proc.poll() is None and "saving its checkpoint" not in log.read_text() and time.time() - t0 < 60:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)  # a repeated notice while the checkpoint is written: ignored
        proc.wait(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == PREEMPTED_EXIT_CODE == 143, output[-3000:]
    stopped = max(m["step"] for m in metrics(work))
    assert stopped in (seen, seen + 1), (seen, stopped)  # only the step in flight is finished
    assert took < 60
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [str(stopped)]
    assert f"checkpoint saved at step {stopped}" in output
    assert json.loads((work / "train_summary.json").read_text())["status"] == "preempted"

    resumed = run_train(work, corpus, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {work / 'checkpoints' / str(stopped)} (step {stopped})" in resumed.stdout
    assert [m["step"] for m in metrics(work)] == list(range(1, 7))
    _assert_same_final_params(reference_run, work)


def test_finished_workdir_is_not_trained_or_compiled_again(tmp_path: Path, corpus: Path, reference_run: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    import shutil

    import jax
    from safetensors.numpy import load_file

    from ditto_jax.train.config import load_sft_config
    from ditto_jax.train.loop import run_training

    work = tmp_path / "run"
    shutil.copytree(reference_run, work)
    summary = json.loads((work / "train_summary.json").read_text())
    cfg = load_sft_config("sft/tiny", [f"data.paths=[{corpus}]", *FAST, *STEPS])
    compiled: list[str] = []

    def on_event(event: str, duration: float, **kwargs: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        result = run_training(cfg, work)
        assert compiled == []  # nothing at all: no model, no train step
        (work / "train_summary.json").unlink()  # e.g. killed after the last checkpoint: rebuilt from metrics.jsonl
        exported = run_training(cfg.model_copy(update={"export_hf": True}), work)
        jax.jit(lambda x: x + 1)(1)  # the listener does see compilations
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiled and compiled[-1] == "jit(<lambda>)"
    assert not any("train_step" in name for name in compiled)
    out = capsys.readouterr().out
    assert out.count("already complete at step 6") == 2 and "nothing to do" in out and "compiled" not in out
    assert dataclasses.asdict(result) == summary
    assert dataclasses.asdict(exported) == summary
    assert json.loads((work / "train_summary.json").read_text()) == summary
    tensors = load_file(str(work / "export" / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                  load_params(work / "checkpoints" / "6")["embed_tokens"])


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path, corpus: Path, reference_run: Path) -> None:
    import shutil

    work = tmp_path / "run"
    shutil.copytree(reference_run, work)
    shutil.rmtree(work / "checkpoints" / "6")
    for f in (work / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage" * 64)
    proc = run_train(work, corpus, *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "checkpoints/4 is unreadable" in out and "resumed from" in out and "(step 2)" in out
    a, b = load_params(reference_run / "checkpoints" / "6"), load_params(work / "checkpoints" / "6")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("override, message", [
    ("optim.peak_lr=-1", "optim.peak_lr"),
    ("train.grad_accum=3", "multiple of train.grad_accum"),
    ("train.stepz=3", "train.stepz"),
    ("data.seq_len=100", "multiple of train.loss_chunk"),
])
def test_invalid_config_fails_before_compiling(tmp_path: Path, corpus: Path, override: str, message: str) -> None:
    t0 = time.time()
    proc = run_train(tmp_path, corpus, override, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "compiled" not in proc.stdout
    assert not (tmp_path / "checkpoints").exists()
    assert time.time() - t0 < 60


def test_missing_and_empty_corpus_are_clear_errors(tmp_path: Path) -> None:
    missing = run_train(tmp_path / "a", tmp_path / "nope.jsonl", timeout=120)
    assert missing.returncode == 1 and "corpus not found" in missing.stderr and "nope.jsonl" in missing.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_train(tmp_path / "b", empty, timeout=120)
    assert proc.returncode == 1 and "no training examples" in proc.stderr
    assert "compiled" not in proc.stdout


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, corpus: Path) -> None:
    proc = run_train(tmp_path, corpus, "train.steps=6", "checkpoint.every=2", "optim.peak_lr=1e30",
                     "optim.end_lr=1e29", "optim.warmup_fraction=0", "optim.clip_norm=null")
    assert proc.returncode == 1
    assert "non-finite loss or gradient at step" in proc.stderr
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
        if (tmp_path / "checkpoints").exists() else []
    for s in steps:
        params = load_params(tmp_path / "checkpoints" / str(s))
        assert all(np.isfinite(v).all() for v in params.values())


def test_load_model_accepts_a_training_workdir_and_step_dir(reference_run: Path) -> None:
    import jax

    from ditto_jax.checkpoints import load_model, tokenizer_dir

    model, cfg = load_model(reference_run)
    params = load_params(reference_run / "checkpoints" / "6")
    np.testing.assert_array_equal(np.asarray(jax.device_get(model.embed_tokens[...])), params["embed_tokens"])
    _, cfg2 = load_model(reference_run / "checkpoints" / "4")
    assert cfg2 == cfg and cfg.vocab_size == 2048
    assert tokenizer_dir(reference_run) == reference_run / "tokenizer"


def test_validation_section_and_its_old_name() -> None:
    """``validation:`` (validation loss during SFT) was called ``eval:``: the old key is still read, with a
    warning; both together are an error naming the new key."""
    cfg = load_sft_config("sft/tiny")
    data = cfg.model_dump(mode="json")
    assert data["validation"] == {"every": 20, "batches": 2, "paths": None, "split": "train"} and "eval" not in data
    old = {("eval" if k == "validation" else k): v for k, v in data.items()}
    with pytest.warns(FutureWarning, match="now `validation:`"):
        assert validate(SFTConfig, old) == cfg
    with pytest.raises(ConfigError, match="give `validation:` only"):
        load_sft_config("sft/tiny", ["eval.every=5"])
