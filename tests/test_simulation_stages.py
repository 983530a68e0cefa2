"""End-to-end simulation on the tiny random-init model: corpus contract, parsing, labels, both languages, and
kill -9 at any stage + resume == an uninterrupted run, byte for byte (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditto_jax.data.characters import default_characters
from ditto_jax.data.corpus import parse_session
from ditto_jax.simulation.prompts import profile_texts
from ditto_jax.simulation.queries import parse_questions

# Smaller than configs/simulate/tiny.yaml (same code path): short outputs, 2 slots so results arrive in waves.
OVERRIDES = [
    "queries.sampling.max_new_tokens=160", "queries.max_question_chars=32", "queries.max_profile_chars=120",
    "responses.sampling.max_new_tokens=12", "responses.max_profile_chars=120",
    "engine.batch_size=2", "engine.max_len=1024", "engine.flush_seconds=0",
]
ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    return env


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "ditto_jax.cli", "simulate", "--config", "simulate/tiny", "--workdir",
            str(workdir), "--no-progress", *OVERRIDES]


def _simulate(workdir: Path, cache: Path) -> None:
    proc = subprocess.run(_cmd(workdir), env=_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _has_output(folder: Path) -> bool:
    return folder.exists() and any(p.is_file() and p.stat().st_size > 0 and p.suffix == ".jsonl"
                                   for p in folder.rglob("*"))


def _simulate_and_kill(workdir: Path, cache: Path, stage: str) -> None:
    """Start a run and kill -9 it as soon as generation outputs of ``stage`` exist on disk."""
    proc = subprocess.Popen(_cmd(workdir), env=_env(cache), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while not _has_output(workdir / "stages" / stage):
            assert proc.poll() is None, f"run ended before any {stage} output appeared"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (workdir / "simulation_report.json").exists(), "the kill came too late to interrupt the run"


def _corpus_bytes(workdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((workdir / "corpus").glob("*.jsonl"))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache) -> Path:
    workdir = tmp_path_factory.mktemp("sim") / "work"
    _simulate(workdir, cache)
    return workdir


def test_corpus_contract_and_report(full_run):
    report = json.loads((full_run / "simulation_report.json").read_text())
    lines = [json.loads(line) for p in sorted((full_run / "corpus").glob("*.jsonl")) for line in p.open()]
    assert lines and report["corpus"]["sessions"] == len(lines)
    assert [s["id"] for s in lines] == sorted(s["id"] for s in lines)
    chars = {c.id: c for c in default_characters()}
    for rec in lines:
        parse_session(rec)
        c = chars[rec["character"]]
        assert rec["system"] == c.brief_intro() and rec["lang"] == c.lang
        for piece in profile_texts(c):
            assert piece not in rec["system"]
    assert {s["lang"] for s in lines} == {"en", "zh"}
    assert report["corpus"]["tfds"]["splits"]["train"] == len(lines)
    assert len(report["samples"]) == min(3, len(lines))
    for stage, counts in report["filters"].items():
        assert counts["total"] == counts["kept"] + sum(v for k, v in counts.items() if k not in ("kept", "total"))
    assert report["seed_model"]["config"] == "model/tiny"


def test_every_finished_query_output_parses(full_run):
    outputs = [json.loads(line) for p in (full_run / "stages" / "queries").rglob("*.jsonl") for line in p.open()]
    assert outputs
    for rec in outputs:
        if rec["finish_reason"] == "stop":
            assert parse_questions(rec["text"], 3) is not None, rec["text"]
    tasks = [json.loads(line) for line in (full_run / "stages" / "queries.jsonl").open()]
    assert all(t["questions"] is not None for t in tasks)  # every prompt parsed within the attempts


def test_turn_labels_follow_the_directed_pairs(full_run):
    questions = {(t["asker"], t["other"]): t["questions"] or []
                 for t in map(json.loads, (full_run / "stages" / "queries.jsonl").open())}
    sessions = [json.loads(line) for line in (full_run / "stages" / "sessions.jsonl").open()]
    kinds = set()
    for s in sessions:
        for t in s["turns"]:
            if t["role"] != "user":
                continue
            kinds.add(t["kind"])
            own, partner = s["character"], s["partner"]
            if t["kind"] == "role_specific":
                assert t["reject"] is False and t["content"] in questions[(own, partner)]
                assert t["evidence_from"] == own
            else:
                assert t["reject"] is True and t["content"] in questions[(partner, own)]
                assert t["evidence_from"] == partner
            assert t["evidence"]
    assert kinds == {"role_specific", "contrastive"}


def test_kill_and_resume_equals_uninterrupted(full_run, cache, tmp_path):
    workdir = tmp_path / "work"
    _simulate_and_kill(workdir, cache, "queries")
    _simulate_and_kill(workdir, cache, "responses")
    _simulate(workdir, cache)
    assert _corpus_bytes(workdir) == _corpus_bytes(full_run)
    for name in ("queries.jsonl", "plans.jsonl", "responses.jsonl", "sessions.jsonl"):
        assert (workdir / "stages" / name).read_bytes() == (full_run / "stages" / name).read_bytes(), name
    # a finished workdir re-runs without loading the model and gives the same counts and corpus
    from ditto_jax.config import load_config
    from ditto_jax.simulation.config import SimulateConfig
    from ditto_jax.simulation.stages import Simulation

    before = json.loads((workdir / "simulation_report.json").read_text())
    sim = Simulation(load_config(SimulateConfig, "simulate/tiny", OVERRIDES), workdir, log=lambda m: None,
                     progress=False, process_index=0, process_count=1)
    after = sim.run()
    assert sim._backend is None
    assert after["filters"] == before["filters"] and after["corpus"]["sessions"] == before["corpus"]["sessions"]
    assert _corpus_bytes(workdir) == _corpus_bytes(full_run)


def test_rerun_with_a_different_config_is_refused(full_run):
    from ditto_jax.config import ConfigError, load_config
    from ditto_jax.simulation.config import SimulateConfig
    from ditto_jax.simulation.stages import Simulation

    for change in (["seed=1"], ["queries.sampling.top_p=0.9"], ["engine.max_len=2048"]):
        cfg = load_config(SimulateConfig, "simulate/tiny", OVERRIDES + change)
        with pytest.raises(ConfigError, match="different config"):
            Simulation(cfg, full_run, log=lambda m: None, process_index=0, process_count=1).run()


def test_config_written_before_new_default_fields_still_resumes(full_run, tmp_path):
    """A workdir whose config.yaml predates fields with defaults (here the sampling sections' seed, stop ids and
    ignore_eos) resumes; the same sections with a different value are refused."""
    import shutil

    import yaml

    from ditto_jax.config import ConfigError, load_config
    from ditto_jax.simulation.config import SimulateConfig
    from ditto_jax.simulation.stages import Simulation

    workdir = tmp_path / "old"
    shutil.copytree(full_run, workdir)
    data = yaml.safe_load((workdir / "config.yaml").read_text())
    for section in ("queries", "responses"):
        for key in ("seed", "stop_token_ids", "ignore_eos"):
            assert key in data[section]["sampling"]
            del data[section]["sampling"][key]
    (workdir / "config.yaml").write_text(yaml.safe_dump(data))
    report = Simulation(load_config(SimulateConfig, "simulate/tiny", OVERRIDES), workdir, log=lambda m: None,
                        progress=False, process_index=0, process_count=1).run()
    assert report["corpus"]["sessions"] > 0
    cfg = load_config(SimulateConfig, "simulate/tiny", OVERRIDES + ["responses.sampling.seed=1"])
    with pytest.raises(ConfigError, match="different config"):
        Simulation(cfg, workdir, log=lambda m: None, process_index=0, process_count=1).run()


def test_cli_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    from ditto_jax.cli import main

    code = main(["simulate", "--config", "simulate/tiny", "--workdir", str(tmp_path / "w"), "queries.attempts=0",
                 "partners.strategy=nearest"])
    err = capsys.readouterr().err
    assert code == 2 and "queries.attempts" in err and "partners.strategy" in err
    assert not (tmp_path / "w").exists()
