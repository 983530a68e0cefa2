"""``ditto-jax grid`` end to end on two random-init model sizes (the real CLI in a subprocess on one CPU device, a
real simulation, real SFT runs, one evaluation): the seed x supervision table and heatmap, the no-role-play
column, resume without redoing work, and config errors before anything runs. Kept small: one supervisor, two
seeds, two SFT steps, one judge sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ditto_jax.config import ConfigError
from ditto_jax.eval.stages import LOG
from ditto_jax.grid.config import load_grid_config

FAST = ["supervisors=[small]", "eval.testset.mtbench_enabled=false", "eval.calibration.enabled=false",
        "sft.train.steps=2", "sft.checkpoint.every=2"]


def grid_cli(*args: str) -> subprocess.CompletedProcess:
    """``ditto-jax grid ...`` on one CPU device (the tests' 8 simulated devices would only add overhead)."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ditto_jax.cli", "grid", *args], capture_output=True, text=True,
                          env=env, timeout=1200)


def test_grid_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "grid"
    args = ["--config", "grid/tiny", "--workdir", str(workdir), "--no-progress", *FAST]
    proc = grid_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(grid["values"]) == {"consistency", "knowledge", "rejection", "mtbench"}
    for metric in ("consistency", "knowledge", "rejection"):
        rows = grid["values"][metric]
        assert len(rows) == 2 and all(len(r) == 2 for r in rows)  # seeds x (small, none)
        assert all(v is not None for r in rows for v in r)
    saved = json.loads((workdir / "grid.json").read_text())
    assert saved["seeds"] == ["small", "large"] and saved["columns"] == ["small", "none"]
    # every cell is the eval report of its candidate: the fine-tunes are the SFT work dirs, the baseline the seed
    for seed in ("small", "large"):
        for col in ("small", "none"):
            rep = json.loads((workdir / "eval" / "runs" / f"{seed}__{col}" / "report.json").read_text())
            i, j = saved["seeds"].index(seed), saved["columns"].index(col)
            assert saved["values"]["consistency"][i][j] == rep["metrics"]["all"]["consistency"]
            source = rep["models"]["candidate"]["source"]
            assert (f"sft/{seed}__small" in source) if col == "small" else source.startswith("random init")
    assert (workdir / "sft" / "large__small" / "metrics.jsonl").exists()
    md = (workdir / "grid.md").read_text()
    assert "| seed \\ supervision | small | none |" in md and "| large |" in md
    assert (workdir / "grid.png").read_bytes().startswith(b"\x89PNG")
    # resume: every stage is found finished; nothing is generated, trained or judged again
    logs = {p: p.read_text() for p in workdir.rglob(LOG)}
    metrics = (workdir / "sft" / "small__small" / "metrics.jsonl").read_text()
    again = grid_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    # no model loaded for generation: every generation stage was found finished
    assert not [ln for ln in again.stderr.splitlines() if ln.startswith("loading")], again.stderr[-3000:]
    assert {p: p.read_text() for p in workdir.rglob(LOG)} == logs
    assert (workdir / "sft" / "small__small" / "metrics.jsonl").read_text() == metrics
    other = grid_cli(*args, "baseline=false")  # another config in the same work dir
    assert other.returncode != 0 and "different config" in other.stderr


def test_grid_config_errors():
    with pytest.raises(ConfigError, match="seeds"):
        load_grid_config("grid/tiny", ["seeds=[small, huge]"])
    with pytest.raises(ConfigError, match="sft.model is set by the grid"):
        load_grid_config("grid/tiny", ["sft.model={config: model/tiny}"])
    with pytest.raises(ConfigError, match="eval"):
        load_grid_config("grid/tiny", ["eval.judge.samples=0"])
