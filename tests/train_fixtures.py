"""Shared fixtures for the trainer tests: a small corpus of short sessions and the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.seq_len=128", "data.global_batch_size=2", "train.loss_chunk=64", "validation.every=0",
        "log.tensorboard=false", "log.progress=false", "checkpoint.async_save=true"]


def write_corpus(path: Path, sessions: int = 12) -> Path:
    """Short two-exchange role-play sessions (each fits a 128-token row)."""
    lines = []
    for i in range(sessions):
        turns = [
            {"role": "user", "content": f"Who are you, and what is item {i}?", "kind": "role_specific",
             "reject": False, "evidence": []},
            {"role": "assistant", "content": f"I am the keeper of item {i}. It is a small brass key."},
            {"role": "user", "content": "Do you know about smartphones?", "kind": "contrastive", "reject": True,
             "evidence": []},
            {"role": "assistant", "content": "I have never heard of such a thing in my time."},
        ]
        lines.append(json.dumps({"id": f"s{i}", "character": "keeper", "lang": "en",
                                 "system": "You are the keeper.", "turns": turns}))
    path.write_text("\n".join(lines) + "\n")
    return path


def train_cmd(workdir: Path, corpus: Path, *extra: str) -> list[str]:
    """The ``ditto-jax train`` command line for the tiny config on ``corpus``."""
    return [sys.executable, "-m", "ditto_jax.cli", "train", "--config", "sft/tiny", "--workdir", str(workdir),
            f"data.paths=[{corpus}]", *FAST, *extra]


def env(devices: int = 1) -> dict[str, str]:
    """Subprocess environment: ``devices`` simulated CPU devices."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run_train(workdir: Path, corpus: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the CLI to completion."""
    return subprocess.run(train_cmd(workdir, corpus, *extra), env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def load_params(step_dir: Path) -> dict:
    """The ``params`` item of a checkpoint step directory as numpy arrays."""
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore((step_dir / "params").absolute())
    return {k: np.asarray(v) for k, v in _flatten(restored).items()}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def metrics(workdir: Path) -> list[dict]:
    """The lines of ``metrics.jsonl``."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
